"""The one analytic FLOPs/params counter, summed over the block decomposition (`evit.blocks`).

Convention (documented once, used by sampling, training levels, search and reports):
- FLOPs are multiply-accumulates (MACs), reported in millions (`flops_m`).
- Counted: every convolution (Cout * Hout * Wout * Cin/groups * k * k, including the
  squeeze-excite 1x1 convs at 1x1 spatial size and the 1x1 shortcut convs), every linear
  layer (tokens * in * out), and in attention Q.K^T (h*N*N*16), A.V (h*N*N*16*v) and
  one MAC per attention score for the softmax (h*N*N).
- Not counted: biases, normalisation layers, activations, pooling, the residual adds and
  the relative-position-bias add. (The reference also skips the SE of the transformer
  downsampling block; we count it, since it is real work on the device.)
- Params: every `nn.Parameter` of the extracted static subnet, including norms and the
  relative-position-bias table cropped to the subnet's token map ((2H-1)^2 per head).

Two conventions, chosen per space (`SearchSpace.flops_convention`, params
`space.flops_convention`); both come from this one counter and the same blocks:
- "true" (default): the rules above, i.e. exactly the MACs of the real forward pass.
- "reference": what the paper's reference implementation (microsoft/Moonlit, ElasticViT)
  counts, so that FLOPs levels, budgets and the released models' figures (T1 62.915 ...
  L3 815.399 MMACs) mean the paper's numbers. It differs from "true" in four rules, all
  about the transformer stages:
  1. the squeeze-excite of a transformer stage's downsampling MBConv is not counted (the
     SE of MBConv stage 2 is);
  2. the 1x1 shortcut conv of that downsampling block is not counted (the strided blocks
     of the MBConv stages keep theirs);
  3. the 3x3 depthwise conv on V costs 1 MAC per output element (N * dv), not 9;
  4. the downsampling block's expand conv is counted at an input side of stride x its
     output side, which overcounts where the input side is odd (160, 176, 224 px).
  Everything else is identical; `tests/test_flops_reference.py` checks the nine released
  models and a hook-based count of random subnets under these rules.

`tests/test_flops_hooks.py` checks these numbers, block by block, against forward hooks on
the real static modules (`evit.nn.static`).

The decomposition into `Block`s (`evit.blocks`) is shared with the static modules and the
latency lookup tables: a subnet's predicted latency is the sum over the same blocks that
its FLOPs are the sum over.

Speed: `count` / `flops_m` / `flops_many` add up per-part costs (prefix, each stage,
head) memoised per space (`cost_tables`), each filled once from `stage_blocks` +
`block_flops`/`block_params`; >100k counts/s once warm. `prefix_cost`, `stage_cost`
and `head_cost` expose the exact integer parts (used by `evit.level_sampler`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np

from evit.arch import Arch, ArchError, Stage, Stem
from evit.blocks import (
    Block,
    has_shortcut_conv,
    head_block,
    mbconv_mid,
    out_side,
    prefix_blocks,
    se_channels,
    stage_blocks_uncached,
)
from evit.space import SearchSpace

# --- per-block costs ---------------------------------------------------------------------

def block_flops(b: Block, convention: str = "true") -> int:
    """MACs of one block under `convention` ("true" or "reference", see the module docstring)."""
    ref = convention == "reference"
    if not ref and convention != "true":
        raise ValueError(f"unknown FLOPs convention {convention!r}; accepted: ['true', 'reference']")
    if b.kind == "first_conv":
        ho = b.h_out
        return 3 * b.c_out * 9 * ho * ho
    if b.kind == "mbconv":
        hi, ho = b.h, b.h_out
        mid = mbconv_mid(b.c_in, b.expansion)
        ref_ds = ref and b.downsample
        if ref_ds:
            hi = b.stride * ho  # rule 4
        f = 0
        if b.expansion != 1:
            f += b.c_in * mid * hi * hi
        f += mid * b.kernel * b.kernel * ho * ho
        if b.se and not ref_ds:  # rule 1
            rd = se_channels(mid, b.se_reduction)
            f += 2 * mid * rd
        f += mid * b.c_out * ho * ho
        # rule 2; the reference counter also charges a 1x1 shortcut conv to every strided
        # MBConv-stage block, even where its own module pools instead (equal widths)
        if ((b.c_in != b.c_out or b.stride != 1) if ref else has_shortcut_conv(b)) and not ref_ds:
            f += b.c_in * b.c_out * ho * ho
        return f
    if b.kind == "attn":
        n = b.h * b.h
        w = b.c_in
        heads = w // b.head_dim
        dv = heads * b.head_dim * b.v_scale
        qk = heads * b.head_dim
        f = n * w * (2 * qk + dv)  # qkv projection (a reference block holds the same rows, laid out otherwise)
        f += dv * (1 if ref else 9) * n  # depthwise 3x3 on V (rule 3)
        f += heads * n * n * b.head_dim  # Q.K^T
        f += heads * n * n  # softmax
        f += heads * n * n * b.head_dim * b.v_scale  # A.V
        f += n * dv * w  # output projection
        f += 2 * n * w * (b.mlp_ratio * w)  # MLP
        return f
    if b.kind == "head":
        n = b.h * b.h
        c6 = b.expansion * b.c_in
        return n * b.c_in * c6 + c6 * b.head_width + b.head_width * b.c_out
    raise ValueError(f"unknown block kind {b.kind!r}")


def block_params(b: Block) -> int:
    """Parameters of the static module for this block (norm affine params included)."""
    if b.kind == "first_conv":
        return 3 * 9 * b.c_out + 2 * b.c_out
    if b.kind == "mbconv":
        mid = mbconv_mid(b.c_in, b.expansion)
        p = 0
        if b.expansion != 1:
            p += b.c_in * mid + 2 * mid
        p += mid * b.kernel * b.kernel + 2 * mid
        if b.se:
            rd = se_channels(mid, b.se_reduction)
            p += mid * rd + rd + rd * mid + mid
        p += mid * b.c_out + 2 * b.c_out
        if has_shortcut_conv(b):
            p += b.c_in * b.c_out + (0 if b.reference else 2 * b.c_out)  # the reference has no shortcut BN
        return p
    if b.kind == "attn":
        w = b.c_in
        heads = w // b.head_dim
        dv = heads * b.head_dim * b.v_scale
        qkv = 2 * heads * b.head_dim + dv
        hidden = b.mlp_ratio * w
        p = 2 * w  # norm1
        p += w * qkv + (0 if b.reference else qkv)  # the reference qkv and V conv have no bias
        p += dv * 9 + (0 if b.reference else dv)  # depthwise V conv
        p += (2 * b.h - 1) ** 2 * heads  # relative-position bias, cropped
        p += dv * w + w  # proj
        p += 2 * w  # norm2
        p += w * hidden + hidden + hidden * w + w
        return p
    if b.kind == "head":
        c6 = b.expansion * b.c_in
        return b.c_in * c6 + 2 * c6 + c6 * b.head_width + b.head_width + b.head_width * b.c_out + b.c_out
    raise ValueError(f"unknown block kind {b.kind!r}")


@dataclass(frozen=True)
class Cost:
    flops_m: float
    params_m: float

    def to_dict(self) -> dict[str, float]:
        return {"flops_m": self.flops_m, "params_m": self.params_m}


# --- fast exact counting ------------------------------------------------------------------
#
# A subnet's cost is a sum of independent parts: the prefix (first conv + stem) depends on
# (resolution, stem); stage i depends on (resolution, its input width, its own choices);
# the head on (resolution, last width). `_CostTables` memoises each part per space, keyed
# by tuples of plain ints, and fills every entry from `stage_blocks` + `block_flops` /
# `block_params`: there is no second formula to drift. (The former `lru_cache` keys
# hashed whole `StageSpace`/`SearchSpace` dataclasses on every call, which capped
# counting at ~25k archs/s; now it is a handful of dict lookups, >100k archs/s.)

_Pair = tuple[int, int]


def _sum_costs(blocks: Sequence[Block], convention: str = "true") -> _Pair:
    return sum(block_flops(b, convention) for b in blocks), sum(block_params(b) for b in blocks)


class _CostTables:
    """Exact (MACs, params) of every prefix / stage / head met so far, for one space.

    Keys are flat tuples of plain ints, e.g. (resolution, c_in, width, depth, expansion,
    kernel) for an MBConv stage: a stage dataclass as (part of) a key would call its
    Python-level __hash__/__eq__ on every lookup, which costs more than all the rest.
    `macs` reads MAC-only dicts (no pair to unpack); both are filled together.
    """

    __slots__ = ("space", "convention", "sides", "prefix", "prefix_f", "stages", "stages_f", "head", "head_f", "is_mb",
                 "choice_of", "prefix_ok", "per_layer")

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.convention = space.flops_convention
        self.sides: dict[int, list[int]] = {}
        self.prefix: dict[tuple[int, ...], _Pair] = {}
        self.prefix_f: dict[tuple[int, ...], int] = {}
        self.stages: list[dict[tuple[int, ...], _Pair]] = [{} for _ in space.stages]
        self.stages_f: list[dict[tuple[int, ...], int]] = [{} for _ in space.stages]
        self.head: dict[tuple[int, int], _Pair] = {}
        self.head_f: dict[tuple[int, int], int] = {}
        self.is_mb = [ss.kind == "mbconv" for ss in space.stages]
        # The hot paths spell the key fields out per kind; the slow path reads them in
        # StageSpace.choices() order. Both must agree (and `_fill_depths` needs depth second).
        self.choice_of = [attrgetter(*ss.choices()) for ss in space.stages]
        for ss, mb in zip(space.stages, self.is_mb):
            want = ["width", "depth", "expansion", "kernel"] if mb else ["width", "depth", "mlp_ratio", "v_scale"]
            assert list(ss.choices()) == want, (ss.kind, list(ss.choices()))
        self.prefix_ok: list[bool | None] = [None] * len(space.stages)  # None: not checked yet
        self.per_layer: list[int] = [0] * len(space.stages)

    def side_list(self, resolution: int) -> list[int]:
        """Input side of every stage, then of the head, at this resolution."""
        sides = self.sides.get(resolution)
        if sides is None:
            h = out_side(resolution, self.space.first_stride)
            sides = []
            for ss in self.space.stages:
                sides.append(h)
                h = out_side(h, ss.stride)
            sides.append(h)
            self.sides[resolution] = sides
        return sides

    # --- filling (slow path) -------------------------------------------------------------------
    def prefix_cost(self, resolution: int, width: int, depth: int, kernel: int) -> _Pair:
        key = (resolution, width, depth, kernel)
        v = self.prefix.get(key)
        if v is None:
            blocks = prefix_blocks(self.space, resolution, Stem(width, depth, kernel))
            v = self.prefix[key] = _sum_costs(blocks, self.convention)
            self.prefix_f[key] = v[0]
        return v

    def stage_cost(self, index: int, resolution: int, c_in: int, stage: Stage) -> _Pair:
        key = (resolution, c_in, *self._choice(index, stage))
        v = self.stages[index].get(key)
        if v is None:
            self._fill_depths(index, resolution, c_in, stage)
            v = self.stages[index][key]
        return v

    def head_cost(self, resolution: int, c: int) -> _Pair:
        key = (resolution, c)
        v = self.head.get(key)
        if v is None:
            v = self.head[key] = _sum_costs([head_block(self.space, self.side_list(resolution)[-1], c)], self.convention)
            self.head_f[key] = v[0]
        return v

    def _choice(self, index: int, stage: Stage) -> tuple[int, ...]:
        try:
            return self.choice_of[index](stage)
        except AttributeError:
            raise ArchError(f"arch.stages[{index}] is a {stage.kind} stage; the '{self.space.name}' space has "
                            f"a {self.space.stages[index].kind} stage there") from None

    def _blocks(self, index: int, resolution: int, c_in: int, stage: Stage) -> tuple[Block, ...]:
        sp = self.space
        return stage_blocks_uncached(sp.stages[index], self.side_list(resolution)[index], c_in, stage,
                                      sp.head_dim, sp.ds_expansion, sp.se_reduction)

    def _fill_depths(self, index: int, resolution: int, c_in: int, stage: Stage) -> None:
        """Fill the entries of `stage` at every allowed depth from one walk over its blocks.

        A deeper stage is the shallower one plus repeated layers at its end, so the cost at
        depth d is a prefix sum over the deepest stage's blocks. The first fill of each stage
        index checks that against summing every depth on its own; should `stage_blocks` ever
        stop working that way, that index keeps summing every depth on its own.
        """
        table, table_f = self.stages[index], self.stages_f[index]
        choice = self._choice(index, stage)
        depths = sorted(set(self.space.stages[index].depths) | {stage.depth})
        lo, hi = depths[0], depths[-1]

        def put(d: int, v: _Pair) -> None:
            key = (resolution, c_in, choice[0], d, *choice[2:])
            table[key] = v
            table_f[key] = v[0]

        if self.prefix_ok[index] is False:
            for d in depths:
                put(d, _sum_costs(self._blocks(index, resolution, c_in, replace(stage, depth=d)), self.convention))
            return
        deepest = self._blocks(index, resolution, c_in, replace(stage, depth=hi))
        n_lo = len(deepest) - (hi - lo) * self.per_layer[index]
        if self.prefix_ok[index] is None:
            shallow = [self._blocks(index, resolution, c_in, replace(stage, depth=d)) for d in depths]
            per_layer, rem = divmod(len(deepest) - len(shallow[0]), hi - lo) if hi > lo else (1, 0)
            ok = rem == 0 and all(deepest[: len(b)] == b and len(b) == len(shallow[0]) + (d - lo) * per_layer
                                  for d, b in zip(depths, shallow))
            self.prefix_ok[index] = ok
            self.per_layer[index] = per_layer
            if not ok:
                for d, b in zip(depths, shallow):
                    put(d, _sum_costs(b, self.convention))
                return
            n_lo = len(shallow[0])
        f = p = 0
        sums = [(0, 0)]
        for b in deepest:
            f += block_flops(b, self.convention)
            p += block_params(b)
            sums.append((f, p))
        for d in depths:
            put(d, sums[n_lo + (d - lo) * self.per_layer[index]])

    def _fill(self, arch: Arch) -> _Pair:
        """(MACs, params) of `arch` through the filling path (first sight of a part, or a bad arch)."""
        res = arch.resolution
        stem = arch.stem
        c = stem.width
        f, p = self.prefix_cost(res, c, stem.depth, stem.kernel)
        for i, st in enumerate(arch.stages[: len(self.stages)]):
            sf, sp = self.stage_cost(i, res, c, st)
            f += sf
            p += sp
            c = st.width
        hf, hp = self.head_cost(res, c)
        return f + hf, p + hp

    # --- lookups (hot path) --------------------------------------------------------------------
    def totals(self, arch: Arch) -> _Pair:
        """(MACs, params) of `arch`: a handful of dict lookups on int tuples."""
        res = arch.resolution
        stem = arch.stem
        c = stem.width
        try:
            f, p = self.prefix[(res, c, stem.depth, stem.kernel)]
            for mb, table, st in zip(self.is_mb, self.stages, arch.stages):
                if mb:
                    v = table[(res, c, st.width, st.depth, st.expansion, st.kernel)]
                else:
                    v = table[(res, c, st.width, st.depth, st.mlp_ratio, st.v_scale)]
                f += v[0]
                p += v[1]
                c = st.width
            v = self.head[(res, c)]
        except (KeyError, AttributeError):
            return self._fill(arch)
        return f + v[0], p + v[1]

    def macs(self, arch: Arch) -> int:
        """MACs of `arch` (what `totals` gives, without the params)."""
        res = arch.resolution
        stem = arch.stem
        c = stem.width
        try:
            f = self.prefix_f[(res, c, stem.depth, stem.kernel)]
            for mb, table, st in zip(self.is_mb, self.stages_f, arch.stages):
                if mb:
                    f += table[(res, c, st.width, st.depth, st.expansion, st.kernel)]
                else:
                    f += table[(res, c, st.width, st.depth, st.mlp_ratio, st.v_scale)]
                c = st.width
            return f + self.head_f[(res, c)]
        except (KeyError, AttributeError):
            return self._fill(arch)[0]


_BY_ID: dict[int, tuple[SearchSpace, _CostTables]] = {}
_BY_SPACE: dict[SearchSpace, _CostTables] = {}
_MAX_SPACES = 64


def cost_tables(space: SearchSpace) -> _CostTables:
    """The memo tables of `space`, found by identity first (hashing a whole space is slow).

    Equal spaces share one table. Entries keep their space alive, so an id is never
    reused while it is a key; both maps are bounded so that code that builds many
    short-lived spaces cannot grow them without limit.
    """
    hit = _BY_ID.get(id(space))
    if hit is not None and hit[0] is space:
        return hit[1]
    t = _BY_SPACE.get(space)
    if t is None:
        if len(_BY_SPACE) >= _MAX_SPACES:
            _BY_SPACE.clear()
        t = _BY_SPACE[space] = _CostTables(space)
    if len(_BY_ID) >= _MAX_SPACES:
        _BY_ID.clear()
    _BY_ID[id(space)] = (space, t)
    return t


def prefix_cost(space: SearchSpace, resolution: int, stem: Stem) -> _Pair:
    """Exact (MACs, params) of the first conv + stem."""
    return cost_tables(space).prefix_cost(resolution, stem.width, stem.depth, stem.kernel)


def stage_cost(space: SearchSpace, index: int, resolution: int, c_in: int, stage: Stage) -> _Pair:
    """Exact (MACs, params) of stage `index` with input width `c_in` at this input resolution."""
    return cost_tables(space).stage_cost(index, resolution, c_in, stage)


def head_cost(space: SearchSpace, resolution: int, c: int) -> _Pair:
    """Exact (MACs, params) of the head after a last stage of width `c`."""
    return cost_tables(space).head_cost(resolution, c)


def count(arch: Arch, space: SearchSpace) -> Cost:
    """FLOPs (MMACs) and params (M) of `arch` in `space`; no forward pass, memoised per part."""
    f, p = cost_tables(space).totals(arch)
    return Cost(f / 1e6, p / 1e6)


def flops_many(archs: Iterable[Arch], space: SearchSpace) -> np.ndarray:
    """FLOPs (MMACs) of many archs as a float64 array (same values as `flops_m`)."""
    t = cost_tables(space)
    return np.fromiter((t.macs(a) for a in archs), dtype=np.float64) / 1e6


def flops_m(arch: Arch, space: SearchSpace) -> float:
    return cost_tables(space).macs(arch) / 1e6


def flops_by_convention(arch: Arch, space: SearchSpace) -> dict[str, float]:
    """FLOPs (MMACs) of `arch` under every convention: {"true": ..., "reference": ...}."""
    from evit.space import FLOPS_CONVENTIONS

    return {c: flops_m(arch, space.with_convention(c)) for c in FLOPS_CONVENTIONS}


def params_m(arch: Arch, space: SearchSpace) -> float:
    return count(arch, space).params_m


def flops_range(space: SearchSpace) -> tuple[float, float]:
    return flops_m(space.smallest(), space), flops_m(space.largest(), space)

