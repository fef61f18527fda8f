"""Which blocks a latency table must hold: derived from the space's choices, not sampled.

A subnet's latency is predicted as the sum over `evit.flops.arch_blocks(arch, space)`, so
a complete LUT holds every `Block` that any valid arch of the space can produce. Sampling
subnets until no new block appears would miss rare combinations; instead
`unique_blocks` walks the stages with the set of reachable (input side, input width,
previous width) states, keeping only choices that can still be completed into a valid
arch (widths never decrease from stage to stage). `tests/test_latency_blocks.py` checks
the result against the blocks of every arch of a small space, enumerated exhaustively.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from evit.arch import Arch
from evit.flops import Block, arch_blocks, out_side
from evit.space import SearchSpace, StageSpace


def _mb_blocks(ss: StageSpace, h: int, c_in: int, width: int, depth: int, space: SearchSpace) -> list[Block]:
    """The blocks of one MBConv stage of `depth` layers (forward order), as arch_blocks builds them."""
    out: list[Block] = []
    for expansion, kernel in itertools.product(ss.expansions, ss.kernels):
        hh, c = h, c_in
        for j in range(depth):
            stride = ss.stride if j == 0 else 1
            out.append(Block("mbconv", hh, c, width, expansion=expansion, kernel=kernel, stride=stride, se=ss.se,
                             se_reduction=space.se_reduction))
            hh, c = out_side(hh, stride), width
    return out


def _vit_blocks(ss: StageSpace, h: int, c_in: int, width: int, depth: int, space: SearchSpace) -> list[Block]:
    ds = Block("mbconv", h, c_in, width, expansion=space.ds_expansion, kernel=3, stride=ss.stride, se=True,
               se_reduction=space.se_reduction)
    out = [ds]
    if depth > 0:
        for mlp_ratio, v_scale in itertools.product(ss.mlp_ratios, ss.v_scales):
            out.append(Block("attn", ds.h_out, width, width, mlp_ratio=mlp_ratio, v_scale=v_scale,
                             head_dim=space.head_dim))
    return out


def _completable(space: SearchSpace) -> list[set[int]]:
    """completable[i] = previous widths p for which stages i.. have a width-monotone choice.

    completable[len(stages)] (nothing left to choose) accepts every width.
    """
    all_widths = {w for s in space.stages for w in s.widths} | set(space.stem_widths) | {0}
    result: list[set[int]] = [set() for _ in space.stages] + [all_widths]
    for i in range(len(space.stages) - 1, -1, -1):
        ok_widths = [w for w in space.stages[i].widths if w in result[i + 1]]
        result[i] = {p for p in all_widths if any(w >= p for w in ok_widths)}
    return result


def unique_blocks(space: SearchSpace) -> list[Block]:
    """Every distinct block any valid arch of `space` contains, sorted (deterministic order)."""
    blocks: set[Block] = set()
    completable = _completable(space)
    # states at a stage's input: (side, input width, previous stage width or 0 for stage 0)
    states: set[tuple[int, int, int]] = set()
    for r, c0 in itertools.product(space.resolutions, space.stem_widths):
        first = Block("first_conv", r, 3, c0, stride=space.first_stride)
        blocks.add(first)
        if max(space.stem_depths) > 0:
            for k in space.stem_kernels:
                blocks.add(Block("mbconv", first.h_out, c0, c0, expansion=1, kernel=k, stride=1, se=False,
                                 se_reduction=space.se_reduction))
        states.add((first.h_out, c0, 0))
    for i, ss in enumerate(space.stages):
        nxt: set[tuple[int, int, int]] = set()
        for h, c_in, prev in states:
            for width in ss.widths:
                if width < prev or width not in completable[i + 1]:
                    continue
                for depth in ss.depths:
                    maker = _mb_blocks if ss.kind == "mbconv" else _vit_blocks
                    sb = maker(ss, h, c_in, width, depth, space)
                    blocks.update(sb)
                    # arch_blocks advances the side only when the stage has blocks
                    h_next = out_side(h, ss.stride) if (ss.kind == "transformer" or depth > 0) else h
                    nxt.add((h_next, width, width))
        states = nxt
    for h, c, _ in states:
        blocks.add(Block("head", h, c, space.num_classes, expansion=space.head_expansion,
                         head_width=space.head_width))
    return sorted(blocks)


def count_by_kind(blocks: Iterable[Block]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.kind] = counts.get(b.kind, 0) + 1
    return dict(sorted(counts.items()))


def sample_subnets(space: SearchSpace, n: int, rng: random.Random) -> list[Arch]:
    """`n` distinct subnets spread over the FLOPs levels (round robin), for validation/sampled LUTs.

    Uses the level sampler when the space has levels (so small and large subnets are both
    represented, as in training), else uniform draws.
    """
    sampler = None
    if space.levels:
        try:
            from evit.level_sampler import LevelSampler

            sampler = LevelSampler(space)
        except ImportError:  # pragma: no cover - only while the level sampler is not installed
            sampler = None
    archs: list[Arch] = []
    seen: set[Arch] = set()
    tries = 0
    while len(archs) < n and tries < 50 * n:
        level = tries % len(space.levels) if space.levels else 0
        tries += 1
        arch = sampler.sample(level, rng) if sampler is not None else space.sample_uniform(rng)
        if arch not in seen:
            seen.add(arch)
            archs.append(arch)
    return archs


def sampled_blocks(space: SearchSpace, n_subnets: int, max_entries: int, rng: random.Random) -> list[Block]:
    """Sampled mode: the distinct blocks of `n_subnets` level-spread subnets, at most `max_entries`.

    Every first conv, stem and head configuration is cheap and few, so they are always
    included; the rest come in the order the subnets were drawn.
    """
    always = [b for b in unique_blocks(space) if b.kind in ("first_conv", "head")
              or (b.kind == "mbconv" and b.expansion == 1)]
    chosen: dict[Block, None] = dict.fromkeys(always)
    for arch in sample_subnets(space, n_subnets, rng):
        for b in arch_blocks(arch, space):
            if len(chosen) >= max_entries:
                break
            chosen.setdefault(b, None)
    return sorted(chosen)
