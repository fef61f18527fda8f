"""What both supernet module families share: the subnet is an argument of `forward`.

A supernet (evit's own `evit.nn.supernet.Supernet`, or the reference layout's
`evit.nn.reference.ReferenceSupernet`) holds one module per position of the largest
subnet. `active(arch)` pairs the positions a subnet uses with its `evit.blocks.Block`s, in
forward order, and `forward` walks those pairs; a family only says which positions an
arch uses (`positions`). Extraction (`evit.nn.static.extract`) reads the same pairs, so
every family extracts, exports and is timed the same way.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from evit.arch import Arch
from evit.blocks import Block, arch_blocks
from evit.space import SearchSpace

ACTIVE_CACHE = 4096
"""Archs whose (position, block) pairs are kept; training revisits level archs and banks often."""


class SupernetBase(nn.Module):
    """All subnets of `space` on shared weights; see the module docstring."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.num_classes = space.num_classes
        self._active: dict[Arch, list[tuple[Any, Block]]] = {}

    CLASSIFIER: str = ""
    """The classifier's module name (its weight and bias are re-initialised for new classes)."""
    STEM: tuple[str, ...] = ()
    """Module names of the stem: the first conv and the stem blocks (frozen first when fine-tuning)."""

    def classifier_keys(self) -> tuple[str, str]:
        return f"{self.CLASSIFIER}.weight", f"{self.CLASSIFIER}.bias"

    def stem_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{m}." for m in self.STEM)

    def positions(self, arch: Arch) -> list[Any]:
        """The modules `arch` runs, in forward order (one per block of `arch_blocks`)."""
        raise NotImplementedError

    def active(self, arch: Arch) -> list[tuple[Any, Block]]:
        """(position, its `Block`) pairs of `arch` in forward order; checks the weights can compute `arch`
        (any choices of the space, widths may decrease: the width rule is for what is drawn). Cached (bounded)."""
        hit = self._active.get(arch)
        if hit is not None:
            return hit
        self.space.validate_computable(arch)
        pairs = list(zip(self.positions(arch), arch_blocks(arch, self.space), strict=True))
        if len(self._active) >= ACTIVE_CACHE:
            self._active.clear()
        self._active[arch] = pairs
        return pairs

    def forward(self, x: Tensor, arch: Arch) -> Tensor:  # type: ignore[override]
        """Logits of subnet `arch` for NCHW images `x` at `arch.resolution`."""
        if x.shape[-1] != arch.resolution or x.shape[-2] != arch.resolution:
            raise ValueError(f"input is {tuple(x.shape[-2:])} px but arch {arch.key} runs at {arch.resolution} px")
        for module, block in self.active(arch):
            x = module(x, block)
        return x
