"""The machine and checkout this process runs on: one description, shared by every record.

Latency tables, latency devices, model cards and the converter pool all say what they ran
on; before this module, each found the CPU's name, the library versions and the usable
CPUs its own way (and two of them disagreed on what an unknown CPU is called).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; elsewhere the platform's answer)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks on this OS
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory a new allocation can get without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or 'missing'."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def module_version(name: str) -> str | None:
    """`<module>.__version__` of an importable module (e.g. torch's local build tag), else None."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    return str(module.__version__)


def runtime_facts() -> dict[str, object]:
    """Host, CPU, OS and the numeric libraries' versions: what a measurement depends on."""
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": module_version("torch"),
        "onnxruntime": module_version("onnxruntime"),
        "numpy": module_version("numpy"),
    }


def describe_host() -> dict[str, str]:
    """The machine a model card says its latency was measured on (strings only: card tags)."""
    facts = runtime_facts()
    info = {k: str(facts[k]) for k in ("platform", "cpu", "cpu_count", "python", "torch")}
    info["machine"] = platform.machine()
    if facts["onnxruntime"] is not None:
        info["onnxruntime"] = str(facts["onnxruntime"])
    return info


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """`git rev-parse HEAD` of the project, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
