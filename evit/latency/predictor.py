"""Predicted latency of a subnet on one device: the sum of its blocks' table entries.

    raw(arch) = overhead + sum over b in arch_blocks(arch) of (entry[b.key] - overhead)
    predict(arch) = a * raw(arch) + b     if the table's fitted correction is used, else raw

Why the overhead term: every entry is timed as a separate call (an onnxruntime
`session.run`, a Python module call), so each carries the runtime's fixed per-call cost,
which the whole subnet pays once. The build times an almost empty module (`overhead_ms`)
and the sum counts that cost once instead of once per block.

Why the linear correction: what the table cannot see (cache effects between blocks,
fused ops across block borders in an exported graph, a machine that got busier between
the LUT build and the end-to-end runs) shows up as a scale and an offset. The LUT stage
fits `a, b` by least squares on relative error over end-to-end measurements, and keeps
them (`correction.used`) only if they lower the cross-validated (held-out) error; the
table file records both errors so the choice can be checked.

Sampled tables (`mode: sampled`) do not hold every block: missing blocks are predicted
by a per-kind linear regression on FLOPs, activation size, params and attention-score
count fitted on the measured ones (`BlockRegression`). A full table never guesses: a
block it lacks is an error (the arch lies outside the table's space).

`predict_many` is what search calls: per-stage sums are cached under the same key as
`evit.flops`' per-stage cache (stage space, input side, input width, stage choices), so
scoring a subnet is a handful of dict look-ups (> 100,000 subnets/s; bench/bench_predictor.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evit.arch import Arch, Stage, Stem
from evit.errors import LUTError
from evit.flops import Block, block_flops, block_params, stage_blocks
from evit.latency.lut import check_space, load_lut
from evit.space import SearchSpace

KINDS = ("first_conv", "mbconv", "attn", "head")


@dataclass(frozen=True)
class Correction:
    """ms = a * raw + b, applied only when `used`."""

    a: float = 1.0
    b: float = 0.0
    used: bool = False

    def apply(self, raw: float) -> float:
        return self.a * raw + self.b if self.used else raw

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "used": self.used}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Correction:
        if not d:
            return cls()
        return cls(float(d.get("a", 1.0)), float(d.get("b", 0.0)), bool(d.get("used", False)))


def fit_affine(raw: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """a, b minimising sum(((a*raw + b - measured) / measured)^2): least squares on relative error."""
    w = 1.0 / measured
    design = np.stack([raw * w, w], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(measured), rcond=None)
    return float(a), float(b)


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


class LatencyPredictor:
    """Latency (ms) of subnets of `space` on one device, from that device's table."""

    def __init__(self, space: SearchSpace, entries_ms: dict[str, float], *, overhead_ms: float = 0.0,
                 correction: Correction | None = None, fallback: BlockRegression | None = None,
                 device: str = "", source: str = "<memory>") -> None:
        self.space = space
        self.entries_ms = entries_ms
        self.overhead_ms = overhead_ms
        self.correction = correction or Correction()
        self.fallback = fallback
        self.device = device
        self.source = source
        self._prefix: dict[tuple[int, Stem], tuple[float, int, int]] = {}
        self._stage: dict[tuple[int, int, int, Stage], tuple[float, int]] = {}
        self._head: dict[tuple[int, int], float] = {}

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
        return cls(space, entries, overhead_ms=float(lut.get("overhead_ms", 0.0)), correction=correction,
                   fallback=fallback, device=device, source=source)

    # --- per block ----------------------------------------------------------------------
    def block_cost(self, b: Block) -> float:
        """The block's share of a subnet's latency (its entry minus the per-call overhead)."""
        ms = self.entries_ms.get(b.key)
        if ms is not None:
            return max(0.0, ms - self.overhead_ms)
        if self.fallback is not None:
            return self.fallback.predict(b)
        raise LUTError(f"latency table {self.source} has no entry {b.key!r}: the subnet is outside the space the "
                       f"table was built for ('{self.space.name}'); rebuild the table or validate the arch")

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
        """Sum of the blocks (+ one call overhead), before the fitted correction."""
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
        return self.correction.apply(self.raw(arch))

    def raw_many(self, archs: Sequence[Arch]) -> np.ndarray:
        raw = self.raw
        return np.fromiter((raw(a) for a in archs), dtype=np.float64, count=len(archs))

    def predict_many(self, archs: Sequence[Arch]) -> np.ndarray:
        """Predicted latencies (ms) of many subnets, as one float64 array."""
        out = self.raw_many(archs)
        if self.correction.used:
            out = self.correction.a * out + self.correction.b
        return out

