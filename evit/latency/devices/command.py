"""Kind `command`: an external benchmark (adb + a phone's runner, a remote board, ...).

The module is written in the device's `format` (the pipeline's own ONNX export, or a
LiteRT / ExecuTorch file) and the command template gets {model}, {input_shape},
{resolution} (and {batch_size}, {threads}, {warmup}, {repeats}); it does its own
warm-up and repeats and prints the latency in ms as the last stand-alone number on stdout
(`evit.latency.ort_runner` is an example). One invocation per module: an external runner
cannot time a module in the context of others.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from evit.config import DeviceParams
from evit.errors import DeviceError
from evit.formats.inputs import seeded_input
from evit.formats.pte import export_pte
from evit.formats.tflite import LiteRTConverter, convert_modules
from evit.latency.devices.base import Device, Item, Prepared
from evit.latency.measurement import Measurement

_NUMBER = re.compile(r"(?<![\w.\-/])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?:ms)?(?![\w.])")
"""A stand-alone number (optionally with an 'ms' suffix): digits inside words or paths
(`/tmp/m1/model.onnx`, `abc123`) are not latencies."""
_PLACEHOLDERS = ("model", "input_shape", "resolution", "batch_size", "threads", "warmup", "repeats")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "<empty>"


class CommandDevice(Device):
    """An external benchmark command: a model file in, one latency in ms printed on stdout."""

    per_call_overhead = True
    _CACHE_SIZE = 0  # a runner invocation is prepared right before it runs, never reused

    def __init__(self, dp: DeviceParams, *, opset: int = 17) -> None:
        super().__init__(dp, opset=opset)
        self._converter: LiteRTConverter | None = None
        """A running LiteRT converter, started on the first `format: tflite` module."""

    def check_available(self) -> None:
        template = self.params.command or ""
        try:
            self._render(Path("model.onnx"), (1, 3, 32, 32))
        except (KeyError, IndexError, ValueError) as exc:
            raise DeviceError(
                f"device '{self.name}': command template {template!r} has a bad placeholder ({exc}); "
                f"accepted placeholders: {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
            ) from None
        try:
            argv0 = shlex.split(template)[0]
        except (ValueError, IndexError):
            raise DeviceError(f"device '{self.name}': command template {template!r} is not a valid shell "
                              "command line") from None
        if not any(ch in argv0 for ch in "{$=") and shutil.which(argv0) is None:
            raise DeviceError(f"device '{self.name}': program {argv0!r} of its command was not found "
                              "(not on PATH and not an executable file)")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["command"] = self.params.command
        return d

    def _render(self, model: Path, input_shape: Sequence[int]) -> str:
        dp = self.params
        values = {
            "model": shlex.quote(str(model)),
            "input_shape": ",".join(str(s) for s in input_shape),
            "resolution": str(input_shape[-1]),
            "batch_size": str(dp.batch_size),
            "threads": str(dp.threads),
            "warmup": str(dp.warmup),
            "repeats": str(dp.repeats),
        }
        return (dp.command or "").format(**values)

    def run_command(self, model: Path, input_shape: Sequence[int]) -> float:
        """Run the template on one ONNX file; the last number on stdout is the latency (ms)."""
        cmd = self._render(model, input_shape)
        timeout = self.params.command_timeout_s
        try:
            proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise DeviceError(f"device '{self.name}': command timed out after {timeout:g} s "
                              f"(devices[].command_timeout_s): {cmd}\nstderr (last lines):\n{_tail(err)}") from None
        if proc.returncode != 0:
            raise DeviceError(f"device '{self.name}': command exited with status {proc.returncode}: {cmd}\n"
                              f"stderr (last lines):\n{_tail(proc.stderr)}")
        numbers = _NUMBER.findall(proc.stdout)
        value = float(numbers[-1]) if numbers else float("nan")
        if not math.isfinite(value) or value <= 0:
            raise DeviceError(
                f"device '{self.name}': command printed no positive latency (expected the last number on stdout "
                f"to be milliseconds): {cmd}\nstdout (last lines):\n{_tail(proc.stdout)}\n"
                f"stderr (last lines):\n{_tail(proc.stderr)}"
            )
        return value

    def measure_many(self, items: Sequence[Item], *, repeats: int | None = None, warmup: int | None = None,
                     rounds: int | None = None) -> list[Measurement]:
        """One command run per module (the command does its own warm-up and repeats)."""
        out = []
        for it in items:
            p = self.prepare(it)
            out.append(Measurement.from_samples([p.step(p.x)]))
        return out

    def measure_chains(self, chains: Sequence[Sequence[Item]], *, repeats: int | None = None,
                       warmup: int | None = None, rounds: int | None = None) -> list[list[Measurement]]:
        """An external runner cannot time a module inside a sequence: each is timed on its own."""
        return [self.measure_many(chain) for chain in chains]

    def close(self) -> None:
        if self._converter is not None:
            self._converter.close()
            self._converter = None
        super().close()

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        shape = item.input_shape
        if self.params.format == "onnx":
            path = self._onnx_file(module, item, workdir)
        else:  # the runner asks for a mobile format (format: tflite | pte)
            path = self._mobile_file(module, shape, workdir)
        return Prepared(lambda _x: self.run_command(path, shape), None)

    def _mobile_file(self, module: nn.Module, input_shape: Sequence[int], workdir: Path) -> Path:
        """`module` as the .tflite or .pte file the runner asks for (`format`)."""
        if self.params.format == "pte":
            path = workdir / "model.pte"
            export_pte(module.eval(), seeded_input(input_shape), path)
            return path
        if self._converter is None:
            self._converter = LiteRTConverter()
        path = workdir / "model.tflite"
        convert_modules(self._converter, {"serving_default": (module, tuple(input_shape))}, path)
        return path
