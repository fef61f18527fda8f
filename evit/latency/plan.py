"""What a device's latency table will measure: the plan, and what a partial build is keyed on.

- `plan_lut`: every unique block the search space can produce (`coverage.unique_blocks`,
  derived from the space's choices), or in `lut_mode: sampled` the blocks of
  `sample_subnets` subnets across the FLOPs levels. A full table larger than
  `max_entries` is refused with the count and the way out (sampled mode). Devices that
  run modules in process time the blocks *in context*, inside "carrier" subnets
  (`coverage.covering_archs`: few valid archs that together contain every block).
- `fingerprint`: what measurements depend on (device settings, host, versions, space);
  a partial table is resumed only while all of it still matches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from evit.arch import Arch
from evit.blocks import Block
from evit.config import DeviceParams
from evit.errors import LUTError
from evit.latency.coverage import count_by_kind, covering_archs, sampled_blocks, unique_blocks
from evit.latency.devices import Device
from evit.latency.lut import FORMAT
from evit.space import SearchSpace


@dataclass(frozen=True)
class Plan:
    mode: str
    blocks: list[Block]
    """Blocks the table will hold (sampled mode: plus any extra a carrier happens to contain)."""
    carriers: list[Arch]
    """In-context devices: the subnets the blocks are timed inside. Empty for isolated devices."""

    def units(self) -> list[str]:
        if self.carriers:
            return [f"carrier|{a.key}" for a in self.carriers]
        return [f"block|{b.key}" for b in self.blocks]


def plan_lut(space: SearchSpace, dp: DeviceParams, *, in_context: bool) -> Plan:
    """What to measure for this device; LUTError if a full table would exceed `max_entries`."""
    if dp.lut_mode == "full":
        blocks = unique_blocks(space)
        if len(blocks) > dp.max_entries:
            carriers = len(covering_archs(space, blocks)) if in_context else None
            how = f" timed inside {carriers} carrier subnets" if carriers else ""
            raise LUTError(
                f"device '{dp.name}': a full latency table of the '{space.name}' space needs {len(blocks)} entries "
                f"({', '.join(f'{k} {v}' for k, v in count_by_kind(blocks).items())}){how}, more than its "
                f"max_entries={dp.max_entries}. Set `lut_mode: sampled` on this device (times the blocks of "
                f"sample_subnets={dp.sample_subnets} subnets across the FLOPs levels and predicts the rest with a "
                "per-kind regression fitted on them), or raise `max_entries` if the device is fast enough"
            )
    else:
        rng = random.Random(f"lut-sample-{dp.seed}")
        blocks = sampled_blocks(space, dp.sample_subnets, dp.max_entries, rng)
    carriers = covering_archs(space, blocks) if in_context else []
    return Plan(dp.lut_mode, blocks, carriers)


def fingerprint(dp: DeviceParams, device: Device, space: SearchSpace, plan: Plan) -> dict[str, Any]:
    """What measurements depend on; a partial table is resumed only if all of it still matches."""
    settings = dp.model_dump(mode="json")
    for k in ("name", "budgets_ms", "validate_subnets", "command_timeout_s", "convert_jobs"):
        settings.pop(k, None)
    if settings.get("precision") == "fp32":  # the default: fp32 tables built before `precision` existed still match
        settings.pop("precision")
    desc = device.describe()
    host = {k: desc.get(k) for k in ("hostname", "cpu", "torch", "onnxruntime", "gpu", "cuda", "clock", "executorch",
                                     "ai-edge-litert") if k in desc or k not in ("executorch", "ai-edge-litert")}
    return {"format": FORMAT, "device": settings, "host": host, "space": space.structure_dict(),
            "opset": device.opset, "method": "in-context" if plan.carriers else "isolated"}
