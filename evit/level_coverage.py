"""How close the counting level sampler is to plain rejection sampling: the coverage check.

`LevelSampler` (evit.level_sampler) targets the distribution rejection sampling gives
(uniform over the valid subnets whose FLOPs lie in the level's window) but draws by
counting. `coverage_report` measures the difference marginal by marginal (total-variation
distance, the TV sampling noise alone would give, a chi-square p-value) and, for scale,
how far a level-blind sampler would be off. Used by `tests/test_level_sampler.py` and
`bench/bench_sampling.py`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evit import flops
from evit.arch import Arch
from evit.level_sampler import LevelSampler
from evit.space import SearchSpace


def coverage_report(sampler: LevelSampler, level: int, n: int, rng: random.Random,
                    max_uniform_draws: int = 2_000_000) -> CoverageReport:
    """Compare `sampler` with plain rejection sampling on `level`, marginal by marginal.

    Draws `n` subnets with `sample` and up to `n` in-window subnets by rejection
    (`space.sample_uniform` + the exact window test, at most `max_uniform_draws`
    uniform draws). For every field (resolution, stem, each stage's width/depth/ratios)
    and for the position of the FLOPs inside the window (10 bins: this is where bucket
    rounding would show), it gives the total-variation distance between the two
    samples and the p-value of a chi-square test that both come from one distribution.
    `baseline_tv` is the TV of the unconditioned uniform draws against the in-window
    ones: what a sampler that ignored the level would score (the check's power).
    """
    space = sampler.space
    lo, hi = space.level_window(level)
    macs = flops.cost_tables(space).macs
    ours = [sampler.sample(level, rng) for _ in range(n)]
    ref: list[Arch] = []
    free: list[Arch] = []
    tried = 0
    while len(ref) < n and tried < max_uniform_draws:
        a = space.sample_uniform(rng)
        tried += 1
        if len(free) < n:
            free.append(a)
        if lo <= macs(a) / 1e6 <= hi:
            ref.append(a)
    getters = dict(marginals(space))
    getters["flops_in_window"] = lambda a: min(9, max(0, int((macs(a) / 1e6 - lo) / (hi - lo) * 10)))
    tv: dict[str, float] = {}
    null: dict[str, float] = {}
    pval: dict[str, float] = {}
    base: dict[str, float] = {}
    for name, get in getters.items():
        p, q = Counter(map(get, ours)), Counter(map(get, ref))
        tv[name] = total_variation(p, q)
        null[name] = null_total_variation(p, q)
        pval[name] = homogeneity_pvalue(p, q)
        if name != "flops_in_window":
            base[name] = total_variation(Counter(map(get, free)), q)
    return CoverageReport(level, len(ours), len(ref), tried, tv, null, pval, base)


@dataclass(frozen=True)
class CoverageReport:
    level: int
    n_sampler: int
    n_rejection: int
    uniform_draws: int
    tv: dict[str, float]
    """Marginal name -> TV distance between `LevelSampler.sample` and rejection sampling."""
    null_tv: dict[str, float]
    """Marginal name -> the TV expected from sampling noise alone at these sample sizes."""
    pvalue: dict[str, float]
    """Marginal name -> chi-square homogeneity p-value (small: the samplers differ)."""
    baseline_tv: dict[str, float]
    """Marginal name -> TV of unconditioned uniform draws vs rejection (a level-blind sampler)."""

    @property
    def acceptance(self) -> float:
        """Share of uniform draws that landed in the window (rejection sampling's yield)."""
        return self.n_rejection / max(1, self.uniform_draws)

    @property
    def max_tv(self) -> tuple[str, float]:
        name = max(self.tv, key=self.tv.__getitem__)
        return name, self.tv[name]

    @property
    def min_pvalue(self) -> tuple[str, float]:
        name = min(self.pvalue, key=self.pvalue.__getitem__)
        return name, self.pvalue[name]

    @property
    def max_baseline_tv(self) -> tuple[str, float]:
        name = max(self.baseline_tv, key=self.baseline_tv.__getitem__)
        return name, self.baseline_tv[name]

    def summary(self) -> dict[str, object]:
        (tv_name, tv), (p_name, p), (b_name, b) = self.max_tv, self.min_pvalue, self.max_baseline_tv
        return {"level": self.level, "n_sampler": self.n_sampler, "n_rejection": self.n_rejection,
                "uniform_draws": self.uniform_draws, "acceptance": round(self.acceptance, 5),
                "mean_tv": round(sum(self.tv.values()) / len(self.tv), 4),
                "mean_null_tv": round(sum(self.null_tv.values()) / len(self.null_tv), 4),
                "max_tv": [tv_name, round(tv, 4)], "min_pvalue": [p_name, round(p, 4)],
                "min_pvalue_bonferroni": round(min(1.0, p * len(self.pvalue)), 4),
                "marginals": len(self.tv), "level_blind_max_tv": [b_name, round(b, 4)]}


def marginals(space: SearchSpace) -> dict[str, Callable[[Arch], int]]:
    """Name -> field getter, for every field of an arch in `space`."""
    out: dict[str, Callable[[Arch], int]] = {
        "resolution": lambda a: a.resolution,
        "stem.width": lambda a: a.stem.width,
        "stem.depth": lambda a: a.stem.depth,
        "stem.kernel": lambda a: a.stem.kernel,
    }
    for i, ss in enumerate(space.stages):
        for name in ss.choices():
            out[f"stages[{i}].{name}"] = (lambda i_, n_: lambda a: getattr(a.stages[i_], n_))(i, name)
    return out


def total_variation(p: Counter, q: Counter) -> float:
    """TV distance between two empirical distributions given as counts."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return 1.0
    return 0.5 * sum(abs(p[k] / np_ - q[k] / nq) for k in set(p) | set(q))


def null_total_variation(p: Counter, q: Counter) -> float:
    """Expected TV between two samples of these sizes drawn from one distribution (the pooled one).

    Normal approximation per category: the difference of the two empirical frequencies
    has sd sqrt(f (1 - f) (1/n1 + 1/n2)), and E|N(0, sd)| = sd sqrt(2/pi).
    """
    n1, n2 = sum(p.values()), sum(q.values())
    if not n1 or not n2:
        return 0.0
    scale = math.sqrt((1 / n1 + 1 / n2) * 2 / math.pi)
    return 0.5 * sum(math.sqrt(f * (1 - f)) * scale
                     for f in ((p[k] + q[k]) / (n1 + n2) for k in set(p) | set(q)))


def homogeneity_pvalue(p: Counter, q: Counter) -> float:
    """Chi-square test that two samples of a categorical variable share one distribution."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(p) | set(q))
    if len(keys) < 2:
        return 1.0
    return float(chi2_contingency(np.array([[p[k] for k in keys], [q[k] for k in keys]])).pvalue)
