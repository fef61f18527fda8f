"""Search spaces: the type (`core`), the shipped presets (`presets`), and the space of the
paper's released supernet built from its config file (`reference`).

`from evit.space import SearchSpace, get_space` covers what most callers need.
"""

from evit.space.core import FLOPS_CONVENTIONS, NON_STRUCTURAL, VARIANTS, FlopsConvention, SearchSpace, StageSpace
from evit.space.presets import CPU, IMAGENET, PRESETS, get_space

__all__ = ["CPU", "FLOPS_CONVENTIONS", "IMAGENET", "NON_STRUCTURAL", "PRESETS", "VARIANTS", "FlopsConvention",
           "SearchSpace", "StageSpace", "get_space"]
