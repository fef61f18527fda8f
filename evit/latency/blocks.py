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

import heapq
import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace

from evit.arch import Arch, Stage, Stem
from evit.flops import Block, arch_blocks, out_side, stage_blocks
from evit.space import SearchSpace, StageSpace


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


def _stage_options(ss: StageSpace, width: int) -> list[Stage]:
    """Every choice of one stage at `width`, at its largest depth (whose blocks include every
    smaller depth's: a stage's layers after the first are identical)."""
    depth = max(ss.depths)
    if ss.kind == "mbconv":
        return [ss.make(width=width, depth=depth, expansion=e, kernel=k)
                for e, k in itertools.product(ss.expansions, ss.kernels)]
    return [ss.make(width=width, depth=depth, mlp_ratio=m, v_scale=v)
            for m, v in itertools.product(ss.mlp_ratios, ss.v_scales)]


def block_witnesses(space: SearchSpace) -> dict[Block, Arch]:
    """Every distinct block a valid arch of `space` can contain, each with one arch containing it.

    Walks the stages with the reachable states (input side, input width, previous width),
    keeping only widths that can still be completed into a valid arch. Blocks are produced
    by `evit.flops.stage_blocks`, the function `arch_blocks` uses, so keys always agree.
    """
    completable = _completable(space)
    found: dict[Block, Arch] = {}

    def complete(resolution: int, stem: Stem, stages: tuple[Stage, ...]) -> Arch:
        """Cheapest valid completion: smallest usable width, first choices, largest depth."""
        rest = list(stages)
        prev = rest[-1].width if rest else 0
        for j in range(len(rest), len(space.stages)):
            ss = space.stages[j]
            width = min(w for w in ss.widths if w >= prev and w in completable[j + 1])
            rest.append(_stage_options(ss, width)[0])
            prev = width
        return Arch(resolution, stem, tuple(rest))

    def note(blocks: Sequence[Block], witness: Arch) -> None:
        for b in blocks:
            found.setdefault(b, witness)

    # prefix states: (side, input width, previous width) -> (resolution, stem, stages so far)
    states: dict[tuple[int, int, int], tuple[int, Stem, tuple[Stage, ...]]] = {}
    stem_depth = max(space.stem_depths)
    for r, c0 in itertools.product(space.resolutions, space.stem_widths):
        for k in space.stem_kernels:
            stem = Stem(c0, stem_depth, k)
            witness = complete(r, stem, ())
            note(arch_blocks(witness, space)[: 1 + stem_depth], witness)
            states.setdefault((out_side(r, space.first_stride), c0, 0), (r, stem, ()))
    for i, ss in enumerate(space.stages):
        nxt: dict[tuple[int, int, int], tuple[int, Stem, tuple[Stage, ...]]] = {}
        for (h, c_in, prev), (r, stem, done) in sorted(states.items()):
            for width in ss.widths:
                if width < prev or width not in completable[i + 1]:
                    continue
                options = _stage_options(ss, width)
                for st in options:
                    blocks = stage_blocks(ss, h, c_in, st, space.head_dim, space.ds_expansion, space.se_reduction)
                    if any(b not in found for b in blocks):
                        note(blocks, complete(r, stem, (*done, st)))
                h_out = stage_blocks(ss, h, c_in, options[0], space.head_dim, space.ds_expansion,
                                     space.se_reduction)[0].h_out
                nxt.setdefault((h_out, width, width), (r, stem, (*done, options[0])))
                if ss.kind == "mbconv" and 0 in ss.depths:  # an empty stage keeps the side
                    nxt.setdefault((h, width, width), (r, stem, (*done, replace(options[0], depth=0))))
        states = nxt
    for (h, c, _), (r, stem, done) in sorted(states.items()):
        arch = Arch(r, stem, done)
        note(arch_blocks(arch, space)[-1:], arch)
    return found


def unique_blocks(space: SearchSpace) -> list[Block]:
    """Every distinct block any valid arch of `space` contains, sorted (deterministic order)."""
    return sorted(block_witnesses(space))


def covering_archs(space: SearchSpace, blocks: Iterable[Block] | None = None) -> list[Arch]:
    """A small set of valid archs that together contain every block (greedy set cover).

    These are the "carriers" a LUT times blocks inside, so each block is measured in the
    context of a real subnet. Candidates are the blocks' witnesses; lazy greedy picks the
    one adding the most uncovered blocks first. Deterministic.
    """
    witnesses = block_witnesses(space)
    todo = set(witnesses if blocks is None else blocks)
    candidates = sorted({witnesses[b] for b in todo})
    cover = {a: set(arch_blocks(a, space)) & todo for a in candidates}
    heap = [(-len(bs), idx) for idx, (a, bs) in enumerate(cover.items())]
    heapq.heapify(heap)
    keys = list(cover)
    chosen: list[Arch] = []
    while todo and heap:
        neg, idx = heapq.heappop(heap)
        arch = keys[idx]
        gain = len(cover[arch] & todo)
        if gain == 0:
            continue
        if gain < -neg:  # stale count: re-queue with the current gain
            heapq.heappush(heap, (-gain, idx))
            continue
        chosen.append(arch)
        todo -= cover[arch]
    return chosen


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
