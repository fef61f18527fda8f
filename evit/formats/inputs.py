"""The example inputs files are traced, lowered, checked and timed with: seeded, standard normal.

One definition, so a converted file, its check against PyTorch and its latency all see
the same tensor for the same shape and seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def seeded_input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A float32 standard-normal tensor of `shape`, the same for the same `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g)
