"""Predicted latency of a subnet on one device: the sum of its blocks' table entries.

    raw(arch) = overhead + sum over b in arch_blocks(arch) of (entry[b.key] - overhead)
    predict(arch) = a * raw(arch) + b      if the table's fitted correction is used, else raw
                    (form 'affine+resolution': b depends on the input resolution)

Why the overhead term: every entry is timed as a separate call (an onnxruntime
`session.run`, a Python module call), so each carries the runtime's fixed per-call cost,
which the whole subnet pays once. The build times an almost empty module (`overhead_ms`)
and the sum counts that cost once instead of once per block.

Why the linear correction: what the table cannot see (cache effects between blocks,
fused ops across block borders in an exported graph, a machine that got busier between
the LUT build and the end-to-end runs) shows up as a scale and an offset; part of it
depends on the input size (e.g. onnxruntime's whole-graph run at the smallest inputs),
hence the per-resolution offset form. Some runtimes carry over each block kind
differently (LiteRT: a converted whole subnet costs about what its attention blocks, head
and first conv cost alone, its MBConv blocks almost nothing, docs/mobile.md), hence the
'per-kind' form, one scale per block kind. The LUT stage fits each form by least squares
on relative error over end-to-end measurements and keeps the one with the lowest
cross-validated (held-out) error, "none" included (`report.choose_correction`); the
table file records every form's held-out error so the choice can be checked.

Sampled tables (`mode: sampled`) do not hold every block: missing blocks are predicted
by a per-kind linear regression on FLOPs, activation size, params and attention-score
count fitted on the measured ones (`BlockRegression`), or, when the table was built
with a `lut.prior` device and that predicted its validation subnets better held out, by
the prior's cost of the block mapped to this device (`Transfer`). A full table never
guesses: a block it lacks is an error (the arch lies outside the table's space).

`predict_many` is what search calls: per-stage sums are cached under the same key as
`evit.flops`' per-stage cache (stage space, input side, input width, stage choices), so
scoring a subnet is a handful of dict look-ups (> 100,000 subnets/s; bench/bench_predictor.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evit.arch import Arch, Stage, Stem
from evit.blocks import Block, arch_blocks, out_side, stage_blocks
from evit.errors import LUTError
from evit.flops import block_flops, block_params
from evit.latency.lut import check_space, load_lut
from evit.space import SearchSpace

KINDS = ("first_conv", "mbconv", "attn", "head")


@dataclass(frozen=True)
class Correction:
    """ms = a * raw + b (or a per-resolution offset instead of b), applied only when `used`.

    Form 'per-kind' (`kind_scale` set): each block kind's share of the sum has its own scale,
    ms = overhead + sum over kinds k of kind_scale[k] * (the kind's blocks' costs) + b. The
    predictor applies the scales to the block costs it sums (so the per-stage caches and the
    vectorised search path stay as they are) and this adds b (with a = 1).
    """

    a: float = 1.0
    b: float = 0.0
    used: bool = False
    b_by_resolution: dict[int, float] | None = None
    """When set, the offset depends on the input resolution (form 'affine+resolution')."""
    kind_scale: dict[str, float] | None = None
    """When set, the scale per block kind (form 'per-kind')."""

    @property
    def form(self) -> str:
        if not self.used:
            return "none"
        if self.kind_scale:
            return "per-kind"
        return "affine+resolution" if self.b_by_resolution else "affine"

    def offset(self, resolution: int) -> float:
        if self.b_by_resolution:
            return self.b_by_resolution.get(resolution, self.b)
        return self.b

    def apply(self, raw: float, resolution: int) -> float:
        return self.a * raw + self.offset(resolution) if self.used else raw

    def apply_many(self, raw: np.ndarray, resolutions: np.ndarray) -> np.ndarray:
        if not self.used:
            return raw
        if self.b_by_resolution:
            offsets = np.array([self.offset(int(r)) for r in resolutions], dtype=np.float64)
            return self.a * raw + offsets
        return self.a * raw + self.b

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"a": self.a, "b": self.b, "used": self.used, "form": self.form}
        if self.b_by_resolution:
            d["b_by_resolution"] = {str(k): v for k, v in sorted(self.b_by_resolution.items())}
        if self.kind_scale:
            d["kind_scale"] = dict(sorted(self.kind_scale.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Correction:
        if not d:
            return cls()
        by_res = d.get("b_by_resolution")
        kinds = d.get("kind_scale")
        return cls(float(d.get("a", 1.0)), float(d.get("b", 0.0)), bool(d.get("used", False)),
                   {int(k): float(v) for k, v in by_res.items()} if by_res else None,
                   {str(k): float(v) for k, v in kinds.items()} if kinds else None)


def fit_affine(raw: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """a, b minimising sum(((a*raw + b - measured) / measured)^2): least squares on relative error."""
    c = fit_correction(raw, measured)
    return c.a, c.b


def fit_correction(raw: np.ndarray, measured: np.ndarray, resolutions: np.ndarray | None = None) -> Correction:
    """The correction minimising the squared relative error; with `resolutions`, one offset per resolution.

    A resolution absent from the fit gets the mean offset `b`.
    """
    w = 1.0 / measured
    if resolutions is None:
        (a, b), *_ = np.linalg.lstsq(np.stack([raw * w, w], axis=1), np.ones_like(measured), rcond=None)
        return Correction(float(a), float(b), used=True)
    levels = sorted({int(r) for r in resolutions})
    cols = [raw * w] + [(resolutions == r) * w for r in levels]
    coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), np.ones_like(measured), rcond=None)
    offsets = {r: float(v) for r, v in zip(levels, coef[1:])}
    return Correction(float(coef[0]), float(np.mean(list(offsets.values()))), used=True, b_by_resolution=offsets)


def fit_kind_correction(kind_costs: np.ndarray, measured: np.ndarray, overhead_ms: float) -> Correction | None:
    """The 'per-kind' correction: measured ~ overhead + sum_k s_k * kind_costs[:, k] + b, least
    squares on relative error; columns follow `KINDS`. None when a scale comes out <= 0 (a
    kind the fit cannot pin down: its extrapolation to other subnets would be meaningless).

    Why: on some runtimes a block's cost alone and inside a converted whole subnet differ by
    a factor that depends on its kind (LiteRT: attention blocks converted alone carry layout
    transposes a whole graph does not), which one scale for the whole sum cannot absorb.
    """
    present = [k for k in range(kind_costs.shape[1]) if np.any(kind_costs[:, k] > 0)]
    w = 1.0 / measured
    x = np.column_stack([kind_costs[:, present], np.ones(len(measured))]) * w[:, None]
    coef, *_ = np.linalg.lstsq(x, np.ones_like(measured), rcond=None)
    scales = {KINDS[k]: float(c) for k, c in zip(present, coef[:-1])}
    if any(v <= 0 for v in scales.values()):
        return None
    return Correction(1.0, float(coef[-1]) - overhead_ms, used=True, kind_scale=scales)


def block_features(b: Block) -> list[float]:
    """What a block's cost scales with: 1, MMACs, activations (M elements in+out), params (M), scores (M)."""
    act = b.c_in * b.h * b.h + b.c_out * b.h_out * b.h_out
    scores = (b.c_in // b.head_dim) * (b.h * b.h) ** 2 if b.kind == "attn" and b.head_dim else 0
    return [1.0, block_flops(b) / 1e6, act / 1e6, block_params(b) / 1e6, scores / 1e6]


@dataclass(frozen=True)
class BlockRegression:
    """Per-kind linear model of a block's cost, for blocks a sampled table did not measure."""

    coef: dict[str, list[float]]

    @classmethod
    def fit(cls, blocks: Sequence[Block], cost_ms: Sequence[float]) -> BlockRegression:
        coef: dict[str, list[float]] = {}
        all_x = np.array([block_features(b) for b in blocks])
        all_y = np.asarray(cost_ms, dtype=np.float64)
        for kind in KINDS:
            mask = np.array([b.kind == kind for b in blocks])
            x, y = (all_x[mask], all_y[mask]) if mask.sum() >= all_x.shape[1] + 2 else (all_x, all_y)
            # relative-error least squares, like the correction; ridge-free, the features are few
            w = 1.0 / np.maximum(y, 1e-6)
            c, *_ = np.linalg.lstsq(x * w[:, None], np.ones_like(y), rcond=None)
            coef[kind] = [float(v) for v in c]
        return cls(coef)

    def predict(self, b: Block) -> float:
        return max(0.0, float(np.dot(self.coef[b.kind], block_features(b))))

    def to_dict(self) -> dict[str, list[float]]:
        return self.coef


TRANSFER_FORMS = ("scale", "power")


@dataclass(frozen=True)
class Transfer:
    """A new device's block costs from a prior device's table (`lut.prior`, issue 24).

    Per block kind, from the pairs (prior cost, this device's in-context cost) of the blocks
    this device measured: form 'scale' cost = s * prior (one ratio per kind), form 'power'
    cost = exp(a) * prior**b (the ratio changes with the block's size: small blocks carry
    more fixed cost on one runtime than on another; LitePred's per-kind transfer). A kind
    with too few pairs takes the ratio of all pairs. `prior_costs` are the prior's raw block
    costs (every block of the space), kept in the table so it never needs the prior's file.
    """

    prior: str
    form: str
    coef: dict[str, list[float]]
    prior_costs: dict[str, float]

    @classmethod
    def fit(cls, prior: str, prior_costs: dict[str, float], pairs: Sequence[tuple[str, float, float]],
            form: str) -> Transfer:
        """`pairs`: (kind, prior cost, this device's cost) of the blocks both measured."""
        ok = [(k, x, y) for k, x, y in pairs if x > 0 and y > 0]
        if not ok:
            raise LUTError(f"transfer from '{prior}': no block both tables measured with a positive cost")

        def ratio(sel: Sequence[tuple[str, float, float]]) -> float:
            r = np.array([x / y for _, x, y in sel])
            return float(np.sum(r) / np.sum(r ** 2))  # least squares on relative error

        every = ratio(ok)
        coef: dict[str, list[float]] = {}
        for kind in KINDS:
            sel = [p for p in ok if p[0] == kind]
            s = ratio(sel) if len(sel) >= 2 else every
            coef[kind] = [math.log(s), 1.0]
            if form == "power" and len(sel) >= 6:
                lx = np.log([x for _, x, _ in sel])
                ly = np.log([y for _, _, y in sel])
                if np.std(lx) > 0.1:
                    (b, a), *_ = np.linalg.lstsq(np.stack([lx, np.ones_like(lx)], axis=1), ly, rcond=None)
                    if 0.25 <= b <= 4.0:
                        coef[kind] = [float(a), float(b)]
        return cls(prior, form, coef, prior_costs)

    def predict(self, b: Block) -> float | None:
        x = self.prior_costs.get(b.key)
        if x is None:
            return None
        a, p = self.coef[b.kind]
        return math.exp(a) * max(x, 1e-9) ** p

    def to_dict(self) -> dict[str, Any]:
        return {"prior": self.prior, "form": self.form, "coef": self.coef, "prior_costs": self.prior_costs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transfer:
        return cls(str(d["prior"]), str(d["form"]), {k: [float(x) for x in v] for k, v in d["coef"].items()},
                   {k: float(v) for k, v in d["prior_costs"].items()})


class LatencyPredictor:
    """Latency (ms) of subnets of `space` on one device, from that device's table."""

    def __init__(self, space: SearchSpace, entries_ms: dict[str, float], *, overhead_ms: float = 0.0,
                 correction: Correction | None = None, fallback: BlockRegression | None = None,
                 device: str = "", source: str = "<memory>", transfer: Transfer | None = None) -> None:
        self.space = space
        self.entries_ms = entries_ms
        self.overhead_ms = overhead_ms
        self.correction = correction or Correction()
        self.fallback = fallback
        self.transfer = transfer
        """Blocks the table did not measure: a prior device's costs mapped to this device (before `fallback`)."""
        self.device = device
        self.source = source
        self._kind_scale = self.correction.kind_scale if self.correction.used else None
        self._prefix: dict[tuple[int, Stem], tuple[float, int, int]] = {}
        self._stage: dict[tuple[int, int, int, Stage], tuple[float, int]] = {}
        self._head: dict[tuple[int, int], float] = {}
        self._tables: Any = False

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, space: SearchSpace) -> LatencyPredictor:
        """The predictor of a finished LUT file; LUTError if partial or built for another space."""
        lut = load_lut(path)
        check_space(lut, space, repr(str(path)))
        return cls.from_lut(lut, space, source=str(path))

    @classmethod
    def from_lut(cls, lut: dict[str, Any], space: SearchSpace, *, use_correction: bool = True,
                 source: str = "<memory>") -> LatencyPredictor:
        stat = lut.get("statistic", "median_ms")
        entries = {k: float(v[stat]) for k, v in lut["entries"].items()}
        fallback = BlockRegression(lut["fallback"]) if lut.get("fallback") else None
        correction = Correction.from_dict(lut.get("correction")) if use_correction else Correction()
        device = lut.get("device", {}).get("name", "")
        transfer = Transfer.from_dict(lut["transfer"]) if lut.get("transfer") else None
        return cls(space, entries, overhead_ms=float(lut.get("overhead_ms", 0.0)), correction=correction,
                   fallback=fallback, device=device, source=source, transfer=transfer)

    # --- per block ----------------------------------------------------------------------
    def block_cost(self, b: Block) -> float:
        """The block's share of a subnet's latency (its entry minus the per-call overhead)."""
        ms = self.entries_ms.get(b.key)
        mapped = self.transfer.predict(b) if ms is None and self.transfer is not None else None
        if ms is not None:
            cost = max(0.0, ms - self.overhead_ms)
        elif mapped is not None:
            cost = mapped
        elif self.fallback is not None:
            cost = self.fallback.predict(b)
        else:
            raise LUTError(f"latency table {self.source} has no entry {b.key!r}: the subnet is outside the space "
                           f"the table was built for ('{self.space.name}'); rebuild the table or validate the arch")
        return cost * self._kind_scale.get(b.kind, 1.0) if self._kind_scale else cost

    def kind_costs(self, archs: Sequence[Arch]) -> np.ndarray:
        """Per subnet, the summed block costs of each kind (columns: `KINDS`): the features of the
        'per-kind' correction."""
        out = np.zeros((len(archs), len(KINDS)))
        col = {k: i for i, k in enumerate(KINDS)}
        for r, a in enumerate(archs):
            for b in arch_blocks(a, self.space):
                out[r, col[b.kind]] += self.block_cost(b)
        return out

    def _blocks_cost(self, blocks: Iterable[Block]) -> float:
        return math.fsum(self.block_cost(b) for b in blocks)

    # --- cached parts (same keys as evit.flops' per-stage cache) ------------------------
    def _prefix_cost(self, resolution: int, stem: Stem) -> tuple[float, int, int]:
        sp = self.space
        first = Block("first_conv", resolution, 3, stem.width, stride=sp.first_stride)
        stem_b = Block("mbconv", first.h_out, stem.width, stem.width, expansion=1, kernel=stem.kernel, stride=1,
                       se=False, se_reduction=sp.se_reduction)
        cost = self.block_cost(first) + (stem.depth * self.block_cost(stem_b) if stem.depth else 0.0)
        v = (cost, first.h_out, stem.width)
        self._prefix[(resolution, stem)] = v
        return v

    def _stage_cost(self, i: int, h: int, c: int, st: Stage) -> tuple[float, int]:
        sp = self.space
        ss = sp.stages[i]
        sb = stage_blocks(ss, h, c, st, sp.head_dim, sp.ds_expansion, sp.se_reduction)
        v = (self._blocks_cost(sb), sb[0].h_out if sb else h)
        self._stage[(i, h, c, st)] = v
        return v

    def _head_cost(self, h: int, c: int) -> float:
        sp = self.space
        b = Block("head", h, c, sp.num_classes, expansion=sp.head_expansion, head_width=sp.head_width)
        v = self.block_cost(b)
        self._head[(h, c)] = v
        return v

    # --- prediction ---------------------------------------------------------------------
    def raw(self, arch: Arch) -> float:
        """Sum of the blocks (+ one call overhead), before the fitted correction's offset and
        scale (a 'per-kind' correction's scales are already in the block costs)."""
        pre = self._prefix.get((arch.resolution, arch.stem)) or self._prefix_cost(arch.resolution, arch.stem)
        ms, h, c = pre
        stage_cache = self._stage
        for i, st in enumerate(arch.stages):
            v = stage_cache.get((i, h, c, st)) or self._stage_cost(i, h, c, st)
            ms += v[0]
            h = v[1]
            c = st.width
        hv = self._head.get((h, c))
        ms += hv if hv is not None else self._head_cost(h, c)
        return ms + self.overhead_ms

    def predict(self, arch: Arch) -> float:
        """Predicted latency of `arch` in ms."""
        return self.correction.apply(self.raw(arch), arch.resolution)

    def raw_many(self, archs: Sequence[Arch]) -> np.ndarray:
        """`raw` of many subnets: dense per-stage tables indexed with numpy (scalar loop as fallback)."""
        if not archs:
            return np.zeros(0)
        tables = self._vector_tables()
        if tables is None:
            raw = self.raw
            return np.fromiter((raw(a) for a in archs), dtype=np.float64, count=len(archs))
        lookups, prefix, stages, head, n_fields = tables
        flat: list[int] = []
        ext = flat.extend
        for a in archs:
            ext((a.resolution, a.stem.width, a.stem.depth, a.stem.kernel))
            for st in a.stages:
                ext(st.__dict__.values())  # dataclass fields in order: width, depth, 2 choices
        try:
            values = np.array(flat, dtype=np.int64).reshape(len(archs), n_fields)
        except ValueError:  # a ragged row: some arch has the wrong number of stages
            raw = self.raw
            return np.fromiter((raw(a) for a in archs), dtype=np.float64, count=len(archs))
        idx = np.empty_like(values)
        for j, lut in enumerate(lookups):
            col = values[:, j]
            ok = (col >= 0) & (col < len(lut))
            idx[:, j] = np.where(ok, lut[np.where(ok, col, 0)], -1)
        out = prefix[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]].copy()
        bad = (idx < 0).any(axis=1)
        for i, table in enumerate(stages):
            c = 4 + 4 * i
            cin = idx[:, 1] if i == 0 else idx[:, c - 4]
            out += table[idx[:, 0], cin, idx[:, c], idx[:, c + 1], idx[:, c + 2], idx[:, c + 3]]
        out += head[idx[:, 0], idx[:, n_fields - 4]]
        bad |= np.isnan(out)
        if bad.any():  # outside the table's space: the scalar path names the missing block
            for a in np.asarray(archs, dtype=object)[bad][:1]:
                self.raw(a)
            raise LUTError(f"latency table {self.source}: {int(bad.sum())} subnets lie outside the "
                           f"'{self.space.name}' space")
        return out + self.overhead_ms

    def _vector_tables(self) -> Any:
        """Dense cost tables for `raw_many`, built once: prefix[r, stem width, depth, kernel],
        stage_i[r, input width, width, depth, choice1, choice2], head[r, last width].

        Only when every stage advances the side (no MBConv depth 0), so a stage's input
        side is a function of the resolution. Invalid combinations hold NaN.
        """
        if self._tables is not False:
            return self._tables
        sp = self.space
        if any(ss.kind == "mbconv" and 0 in ss.depths for ss in sp.stages):
            self._tables = None
            return None

        def lookup(values: Sequence[int]) -> np.ndarray:
            arr = np.full(max(values) + 1, -1, dtype=np.int64)
            arr[list(values)] = np.arange(len(values))
            return arr

        lookups = [lookup(sp.resolutions), lookup(sp.stem_widths), lookup(sp.stem_depths), lookup(sp.stem_kernels)]
        for ss in sp.stages:
            lookups.extend(lookup(v) for v in ss.choices().values())

        def cost(fn: Any, *args: Any) -> float:
            try:
                return fn(*args)
            except LUTError:
                return float("nan")

        prefix = np.full([len(sp.resolutions), len(sp.stem_widths), len(sp.stem_depths), len(sp.stem_kernels)],
                         np.nan)
        for (ri, r), (wi, w), (di, d), (ki, k) in itertools.product(
                enumerate(sp.resolutions), enumerate(sp.stem_widths), enumerate(sp.stem_depths),
                enumerate(sp.stem_kernels)):
            v = cost(self._prefix_cost, r, Stem(w, d, k))
            prefix[ri, wi, di, ki] = v if isinstance(v, float) else v[0]
        stages = []
        sides = [out_side(r, sp.first_stride) for r in sp.resolutions]
        in_widths: Sequence[int] = sp.stem_widths
        for i, ss in enumerate(sp.stages):
            ch = ss.choices()
            names = list(ch)
            table = np.full([len(sp.resolutions), len(in_widths), *(len(v) for v in ch.values())], np.nan)
            for ri, h in enumerate(sides):
                for ci, c in enumerate(in_widths):
                    for combo in itertools.product(*(enumerate(v) for v in ch.values())):
                        st = ss.make(**{n: v for n, (_, v) in zip(names, combo)})
                        if st.width < c and i > 0:
                            continue  # widths never decrease between stages
                        v = cost(self._stage_cost, i, h, c, st)
                        table[(ri, ci, *(j for j, _ in combo))] = v if isinstance(v, float) else v[0]
            stages.append(table)
            sides = [out_side(h, ss.stride) for h in sides]
            in_widths = ss.widths
        head = np.full([len(sp.resolutions), len(in_widths)], np.nan)
        for (ri, h), (wi, w) in itertools.product(enumerate(sides), enumerate(in_widths)):
            head[ri, wi] = cost(self._head_cost, h, w)
        self._tables = (lookups, prefix, stages, head, 4 + 4 * len(sp.stages))
        return self._tables

    def predict_many(self, archs: Sequence[Arch]) -> np.ndarray:
        """Predicted latencies (ms) of many subnets, as one float64 array."""
        out = self.raw_many(archs)
        if self.correction.used:
            res = np.fromiter((a.resolution for a in archs), dtype=np.int64, count=len(archs))
            out = self.correction.apply_many(out, res)
        return out

