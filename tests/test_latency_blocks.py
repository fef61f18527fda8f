"""Which blocks a LUT holds: derived from the space, checked against brute force."""

from __future__ import annotations

import random

from test_latency_helpers import TINY, all_archs

from evit.blocks import arch_blocks
from evit.latency.coverage import (
    block_witnesses,
    count_by_kind,
    covering_archs,
    sample_subnets,
    sampled_blocks,
    unique_blocks,
)
from evit.space import SearchSpace, StageSpace, get_space


def _brute_force(space: SearchSpace) -> set:
    return {b for a in all_archs(space) for b in arch_blocks(a, space)}


def test_unique_blocks_equal_the_blocks_of_every_arch() -> None:
    assert set(unique_blocks(TINY)) == _brute_force(TINY)
    assert len(unique_blocks(TINY)) == 28


def test_width_rule_prunes_blocks_that_no_valid_arch_has() -> None:
    # stage 2 narrower than stage 1 at width 8 is invalid, and stage 1 at 24 leaves stage 2 nothing
    space = SearchSpace(
        name="rule", resolutions=(16,), stem_widths=(8,), stem_depths=(1,), stem_kernels=(3,),
        stages=(StageSpace("mbconv", (8, 24), (1,), 2, expansions=(2,), kernels=(3,)),
                StageSpace("mbconv", (8, 16), (1,), 1, expansions=(2,), kernels=(3,))),
        head_expansion=2, head_width=16, num_classes=3)
    blocks = unique_blocks(space)
    assert set(blocks) == _brute_force(space)
    assert not any(b.c_out == 24 or b.c_in == 24 for b in blocks)


def test_witnesses_are_valid_archs_containing_their_block() -> None:
    for b, arch in block_witnesses(TINY).items():
        TINY.validate(arch)
        assert b in arch_blocks(arch, TINY)


def test_carriers_cover_every_block_with_few_valid_archs() -> None:
    carriers = covering_archs(TINY)
    covered = set()
    for a in carriers:
        TINY.validate(a)
        covered.update(arch_blocks(a, TINY))
    assert covered == set(unique_blocks(TINY))
    # lower bound: one carrier per distinct transformer downsampling block (r x c_in x width)
    assert len(carriers) == 8


def test_cpu_preset_counts_and_carriers() -> None:
    cpu = get_space("cpu")
    blocks = unique_blocks(cpu)
    assert len(blocks) == 342
    assert count_by_kind(blocks) == {"attn": 48, "first_conv": 6, "head": 9, "mbconv": 279}
    rng = random.Random(0)
    for _ in range(300):  # random archs never produce a block outside the table
        assert set(arch_blocks(cpu.sample_uniform(rng), cpu)) <= set(blocks)
    assert len(covering_archs(cpu)) == 90


def test_imagenet_preset_count() -> None:
    assert len(unique_blocks(get_space("imagenet"))) == 3718


def test_sampled_blocks_cap_and_always_keep_cheap_kinds() -> None:
    cpu = get_space("cpu")
    chosen = sampled_blocks(cpu, 20, 60, random.Random(0))
    assert len(chosen) <= 60
    kinds = count_by_kind(chosen)
    assert kinds["first_conv"] == 6 and kinds["head"] == 9
    assert set(chosen) <= set(unique_blocks(cpu))


def test_sample_subnets_distinct_and_seeded() -> None:
    cpu = get_space("cpu")
    a = sample_subnets(cpu, 30, random.Random(1))
    assert len(set(a)) == 30
    assert a == sample_subnets(cpu, 30, random.Random(1))
