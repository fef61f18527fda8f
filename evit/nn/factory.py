"""Which supernet module family a space is built with: the one place that decides it.

A default space gets evit's own `Supernet`; a reference-variant space (the paper's
released layout, `evit.space.reference`) gets `ReferenceSupernet`, whose parameters are
the released checkpoint's key for key. Both take `forward(x, arch)`.
"""

from __future__ import annotations

from evit.errors import UserError
from evit.nn.reference import ReferenceSupernet
from evit.nn.supernet import Supernet
from evit.nn.supernet_base import SupernetBase
from evit.space import SearchSpace


def build_supernet(space: SearchSpace, drop_path: float = 0.0) -> SupernetBase:
    """The supernet module family of `space.variant` (see the module docstring)."""
    if space.variant == "reference":
        if drop_path > 0:
            raise UserError("train.drop_path > 0 is not supported for a reference-variant space; set it to 0")
        return ReferenceSupernet(space)
    return Supernet(space, drop_path=drop_path)
