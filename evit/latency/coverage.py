"""Which blocks a latency table must hold, and the carrier subnets that cover them.

A subnet's latency is predicted as the sum over `evit.blocks.arch_blocks(arch, space)`, so
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from evit.arch import Arch, Stage, Stem
from evit.blocks import Block, arch_blocks, head_block, out_side, stage_blocks
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
    by `evit.blocks.stage_blocks`, the function `arch_blocks` uses, so keys always agree.
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


@dataclass
class _Edge:
    """One choice in the layered graph of `covering_archs`: from a state, via a part, to a state."""

    src: tuple[int, int, int] | None
    dst: tuple[int, int, int] | None
    part: Any
    blocks: frozenset[Block]
    gain: int = 0


def _layers(space: SearchSpace) -> list[list[_Edge]]:
    """Edges of the state graph: layer 0 = (resolution, stem), then one layer per stage, then heads."""
    completable = _completable(space)
    stem_depth = max(space.stem_depths)
    first_layer: list[_Edge] = []
    for r, c0, k in itertools.product(space.resolutions, space.stem_widths, space.stem_kernels):
        stem = Stem(c0, stem_depth, k)
        bs = arch_blocks(Arch(r, stem, ()), space)[: 1 + stem_depth]
        first_layer.append(_Edge(None, (bs[0].h_out, c0, 0), (r, stem), frozenset(bs)))
    layers = [first_layer]
    states = sorted({e.dst for e in first_layer if e.dst is not None})
    for i, ss in enumerate(space.stages):
        layer: list[_Edge] = []
        for h, c_in, prev in states:
            for width in ss.widths:
                if width < prev or width not in completable[i + 1]:
                    continue
                for st in _stage_options(ss, width):
                    sb = stage_blocks(ss, h, c_in, st, space.head_dim, space.ds_expansion, space.se_reduction)
                    layer.append(_Edge((h, c_in, prev), (sb[0].h_out, width, width), st, frozenset(sb)))
        layers.append(layer)
        states = sorted({e.dst for e in layer if e.dst is not None})
    heads = [_Edge(st, None, None, frozenset([head_block(space, st[0], st[1])])) for st in states]
    layers.append(heads)
    return layers


def covering_archs(space: SearchSpace, blocks: Iterable[Block] | None = None) -> list[Arch]:
    """A small set of valid archs that together contain every block of `blocks` (default: all).

    These are the "carriers" a LUT times blocks inside, so that each block is measured in
    the context of a real subnet. Each carrier is the valid arch containing the most
    not-yet-covered blocks: a longest path through the layered graph of stage states
    (side, input width, previous width) whose edges are stage choices (at their largest
    depth) weighted by their uncovered blocks. Repeats until everything is covered; for
    the cpu preset that meets the lower bound (the number of distinct first layers of
    the busiest stage). Deterministic.
    """
    layers = _layers(space)
    todo = set(unique_blocks(space) if blocks is None else blocks)
    by_block: dict[Block, list[_Edge]] = {}
    for layer in layers:
        for e in layer:
            e.gain = len(e.blocks & todo)
            for b in e.blocks:
                by_block.setdefault(b, []).append(e)
    carriers: list[Arch] = []
    while todo:
        # longest path: best[state] = (value, path of edges)
        best: dict[Any, tuple[int, tuple[_Edge, ...]]] = {None: (0, ())}
        for layer in layers:
            nxt: dict[Any, tuple[int, tuple[_Edge, ...]]] = {}
            for e in layer:
                src = best.get(e.src)
                if src is None:
                    continue
                value = src[0] + e.gain
                cur = nxt.get(e.dst)
                if cur is None or value > cur[0]:
                    nxt[e.dst] = (value, (*src[1], e))
            best = nxt
        value, path = best[None]
        if value <= 0:  # pragma: no cover - every block lies on some valid path
            raise ValueError(f"{len(todo)} blocks are not produced by any arch of space '{space.name}'")
        (r, stem), stages = path[0].part, tuple(e.part for e in path[1:-1])
        arch = Arch(r, stem, stages)
        carriers.append(arch)
        for b in set(arch_blocks(arch, space)) & todo:
            todo.discard(b)
            for e in by_block.get(b, ()):
                e.gain -= 1
    return carriers


def count_by_kind(blocks: Iterable[Block]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.kind] = counts.get(b.kind, 0) + 1
    return dict(sorted(counts.items()))


def sample_subnets(space: SearchSpace, n: int, rng: random.Random) -> list[Arch]:
    """`n` distinct subnets spread over the FLOPs levels (round robin), for validation/sampled LUTs.

    Uses the level sampler when the space has levels (so small and large subnets are both
    represented, as in training); levels that hold no subnet are skipped, and a space
    without levels is sampled uniformly.
    """
    from evit.level_sampler import LevelError, LevelSampler

    levels = list(range(len(space.levels)))
    sampler = LevelSampler(space) if levels else None
    archs: list[Arch] = []
    seen: set[Arch] = set()
    tries = 0
    while len(archs) < n and tries < 50 * n:
        tries += 1
        arch = None
        while sampler is not None and levels and arch is None:
            level = levels[tries % len(levels)]
            try:
                arch = sampler.sample(level, rng)
            except LevelError:  # an unreachable level (e.g. custom levels): draw from the others
                levels.remove(level)
        if arch is None:
            arch = space.sample_uniform(rng)
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
