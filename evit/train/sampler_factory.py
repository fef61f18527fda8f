"""The sampler `train.sampler` names, built from the `train` params (one place for all callers).

The training loop, the ablation's conflict probe, and the benchmarks all build their
sampler here, so a knob in params means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

from evit.space import SearchSpace
from evit.train.elastic import (
    CompressedElasticSampler,
    CompressedSettings,
    ElasticSampler,
    ElasticSettings,
)
from evit.train.samplers import (
    SAMPLERS,
    ComplexitySampler,
    FlatSampler,
    LevelSamplerLike,
    SubnetSampler,
    UniformSampler,
)


def elastic_settings(train: Any) -> ElasticSettings:
    return ElasticSettings(bank_capacity=train.bank_capacity, bank_capacity_big=train.bank_capacity_big,
                           bank_big_from_m=train.bank_big_from_m, exploit_p_start=train.exploit_p_start,
                           exploit_p_step=train.exploit_p_step, exploit_p_every_epochs=train.exploit_p_every_epochs,
                           explore_candidates=train.explore_candidates)


def compressed_settings(train: Any) -> CompressedSettings:
    c = train.elastic_compressed
    return CompressedSettings(bank_capacity=c.bank_capacity, exploit_p_start=train.exploit_p_start,
                              exploit_p_step=train.exploit_p_step, exploit_p_every=c.exploit_p_every,
                              explore_candidates=train.explore_candidates, rescore_per_epoch=c.rescore_per_epoch,
                              rescore_entries=c.rescore_entries)


def make_sampler(name: str, space: SearchSpace, seed: int, *, steps_per_epoch: int, total_steps: int,
                 train: Any | None = None, level_sampler: LevelSamplerLike | None = None) -> SubnetSampler:
    """The sampler `name`, seeded by `seed` (the same on every rank), with `train`'s knobs.

    `train`: the `train` params section (None: the defaults of `evit.config.TrainParams`).
    """
    if train is None:
        from evit.config import TrainParams

        train = TrainParams()
    if name == "uniform":
        return UniformSampler(space, seed)
    if name == "flat":
        return FlatSampler(space, seed)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {list(SAMPLERS)}")
    if level_sampler is None:
        from evit.level_sampler import LevelSampler

        level_sampler = LevelSampler(space)
    mins = tuple(train.shared_min_levels)
    if name == "complexity":
        return ComplexitySampler(space, seed, level_sampler, mins)
    if name == "elastic":
        return ElasticSampler(space, seed, level_sampler, steps_per_epoch, elastic_settings(train), mins)
    return CompressedElasticSampler(space, seed, level_sampler, steps_per_epoch, total_steps,
                                    compressed_settings(train), mins)
