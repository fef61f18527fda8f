"""Search targets: a latency budget of a device, or a FLOPs budget (the reference's mode).

A `Budget` knows its label, which doubles as the export folder name and the MLflow alias
of the model chosen for it. MLflow aliases may only hold letters, digits, `_` and `-`
(and must not look like `v3` or be `latest`), so `1.5 ms` becomes `1_5ms` and
`12 MFLOPs` becomes `12mflops`.

A third kind, "arch", is not searched: it is a fixed architecture (a released model
such as `S1`, or an arch JSON file) listed in `search.fixed_archs` or given to
`evit export --arch`. It goes through the same evaluation, export and registry as a
searched subnet; its label is the arch's name (`s1`, `l1_5`) and its value its FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

BudgetKind = Literal["latency", "flops", "arch"]


def _plain_number(value: float) -> str:
    """`1.5` -> '1.5', `3.0` -> '3', `1e6` -> '1000000' (no exponent, no trailing zeros)."""
    text = format(Decimal(repr(float(value))).normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True, order=True)
class Budget:
    kind: BudgetKind
    value: float
    name: str = ""
    """kind "arch" only: the arch's name (e.g. 'S1')."""

    @property
    def unit(self) -> str:
        return "ms" if self.kind == "latency" else "mflops"

    @property
    def label(self) -> str:
        """Alias-safe name, e.g. '1_5ms', '12mflops' or 's1' (MLflow alias rules: [A-Za-z0-9_-])."""
        if self.kind == "arch":
            from evit.released import arch_label

            return arch_label(self.name)
        return _plain_number(self.value).replace(".", "_") + self.unit

    @property
    def text(self) -> str:
        """Human form for logs and cards, e.g. '1.5 ms' or 'arch S1'."""
        if self.kind == "arch":
            return f"arch {self.name}"
        return f"{_plain_number(self.value)} {'ms' if self.kind == 'latency' else 'MFLOPs'}"

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "value": self.value, "label": self.label, "unit": self.unit}
        if self.kind == "arch":
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Budget:
        kind = data["kind"]
        if kind not in ("latency", "flops", "arch"):
            raise ValueError(f"budget kind {kind!r}; accepted: 'latency', 'flops', 'arch'")
        return cls(kind, float(data["value"]), str(data.get("name", "")))  # type: ignore[arg-type]


def device_budgets(budgets_ms: Sequence[float], flops_budgets_m: Sequence[float]) -> list[Budget]:
    """All budgets searched for one device: its latency budgets, then the FLOPs budgets."""
    out = [Budget("latency", float(b)) for b in budgets_ms]
    out += [Budget("flops", float(f)) for f in flops_budgets_m]
    seen: set[str] = set()
    unique = []
    for b in out:
        if b.label not in seen:  # 1.5 and 1.50 are one budget
            seen.add(b.label)
            unique.append(b)
    return unique
