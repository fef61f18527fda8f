"""The memory banks of performance-aware sampling: per FLOPs level, the best subnets seen.

`MemoryBank` holds (arch, score) entries of one level (the samplers of `evit.train.elastic`
fill and draw from them; that module's docstring explains the scores); `banks_to_json` and
`load_banks` read them back from a sampler state or a checkpoint, as search seeds its
populations from them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evit import flops
from evit.arch import Arch
from evit.resolve import restore_space
from evit.space import SearchSpace
from evit.train.checkpoint import load_checkpoint


@dataclass
class BankEntry:
    score: float
    """-CE (hard labels) when last measured."""
    advantage: float
    """What ranks the bank: the score itself (`elastic`), or the score minus the same step's
    score of the level's min subnet (`elastic-compressed`)."""
    step: int
    """Training step of the last measurement."""


class MemoryBank:
    """(arch, score) entries of one FLOPs level, at most `capacity`; insertion-ordered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[Arch, BankEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, arch: object) -> bool:
        return arch in self.entries

    def more_than_half_full(self) -> bool:
        return len(self.entries) > self.capacity // 2

    def at_least_half_full(self) -> bool:
        return len(self.entries) >= self.capacity // 2

    def offer(self, arch: Arch, entry: BankEntry) -> bool:
        """Insert, refresh (arch already in), or replace the worst entry if better; True if kept."""
        if arch in self.entries or len(self.entries) < self.capacity:
            self.entries[arch] = entry
            return True
        worst = min(self.entries, key=lambda a: self.entries[a].advantage)
        if entry.advantage > self.entries[worst].advantage:
            del self.entries[worst]
            self.entries[arch] = entry
            return True
        return False

    def best(self) -> Arch | None:
        if not self.entries:
            return None
        return max(self.entries, key=lambda a: self.entries[a].advantage)

    def draw(self, rng: random.Random) -> Arch:
        """One arch with probability softmax(advantage) (= softmax of the scores moved to now)."""
        archs = list(self.entries)
        adv = [self.entries[a].advantage for a in archs]
        top = max(adv)
        weights = [math.exp(v - top) for v in adv]
        return rng.choices(archs, weights=weights, k=1)[0]

    def to_list(self) -> list[dict[str, Any]]:
        return [{"arch": a.key, "score": e.score, "advantage": e.advantage, "step": e.step}
                for a, e in self.entries.items()]

    @classmethod
    def from_list(cls, capacity: int, items: Sequence[dict[str, Any]]) -> MemoryBank:
        bank = cls(capacity)
        for it in items:
            bank.entries[Arch.from_key(str(it["arch"]))] = BankEntry(
                float(it["score"]), float(it["advantage"]), int(it["step"]))
        return bank


def banks_to_json(sampler_state: dict[str, Any], space: SearchSpace) -> dict[str, list[dict[str, Any]]]:
    """The banks of an elastic sampler state as JSON: level -> [{arch, arch_json, score, ...}], best first."""
    out: dict[str, list[dict[str, Any]]] = {}
    baseline = {int(k): float(v) for k, v in sampler_state.get("baseline", {}).items()}
    for lv, items in sampler_state.get("banks", {}).items():
        base = baseline.get(int(lv), 0.0)
        rows = []
        for it in sorted(items, key=lambda it: -float(it["advantage"])):
            arch = Arch.from_key(str(it["arch"]))
            rows.append({"arch": arch.key, "arch_json": arch.to_dict(), "score": float(it["advantage"]) + base,
                         "measured_score": float(it["score"]), "measured_step": int(it["step"]),
                         "flops_m": round(flops.flops_m(arch, space), 4)})
        out[str(lv)] = rows
    return out


def load_banks(path: str | Path) -> dict[int, list[tuple[Arch, float]]]:
    """Memory banks of a training checkpoint: level -> [(arch, score)], best first.

    Score = -CE at its last measurement (`elastic`) or moved to the end of training
    (`elastic-compressed`; see `evit.train.elastic`). Raises
    CheckpointError when the file is unreadable, KeyError when the run kept no banks (the
    uniform and complexity samplers).
    """
    ckpt = load_checkpoint(path)
    sampler = ckpt.get("sampler") or {}
    if "banks" not in sampler:
        raise KeyError(f"{path} has no memory banks (sampler {sampler.get('name')!r})")
    space = restore_space(ckpt["space"])
    table = banks_to_json(sampler, space)
    return {int(lv): [(Arch.from_dict(r["arch_json"]), float(r["score"])) for r in rows] for lv, rows in table.items()}
