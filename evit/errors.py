"""Errors a user can act on: the CLI prints their message alone, with exit code 2.

Each names the bad value, where it came from and what would be accepted. Anything else
that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class of errors caused by input (params, data, archs, devices, checkpoints)."""


class DataError(UserError):
    """The dataset source is unreadable, too small or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is corrupt, missing or from another search space."""


class DeviceError(UserError):
    """A latency device is unknown, absent, or its benchmark command failed."""


class LUTError(UserError):
    """A latency table is partial, corrupt or built for another space/device."""


class RegistryError(UserError):
    """The model registry is unreachable or a model reference cannot be resolved."""
