"""LiteRT (.tflite) export through the converter venv, and in-process LiteRT runs.

`LiteRTConverter` starts `evit/formats/litert_worker.py` once in the converter's own venv
(evit.formats.litert_env, created on first use) and keeps it for many conversions, so
the converter's import cost (torch, jax, litert) is paid once per table or export run.
`convert_modules` converts several modules (e.g. a latency table's blocks) into one file,
one signature each, through `torch.export` programs (`export_pt2`).
The interface is plain files: arch JSON + safetensors (+ the space as JSON) in, a
.tflite out; the main process never imports litert-torch.

`convert_subnet_int8` makes the int8 file (quantized inside the converter venv by
`evit.formats.quantize`, the same function and float policy as the int8 .pte).
`TfliteRunner` / `run_tflite` run a .tflite with the `ai-edge-litert` interpreter from
the main lock; its default XNNPACK delegate is the CPU path a phone's LiteRT takes.
`full_delegation` asks LiteRT's own benchmark tool whether XNNPACK took every op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import evit
from evit.errors import UserError
from evit.formats.inputs import seeded_input
from evit.formats.litert_env import ensure_env

log = logging.getLogger(__name__)


class LiteRTError(UserError):
    """A LiteRT conversion or run failed."""


class LiteRTConverter:
    """One long-lived converter process; use as a context manager (or call `close`)."""

    def __init__(self, *, timeout_s: float = 900.0) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._shim: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: list[str] = []
        self.conversions = 0
        self.seconds = 0.0

    def __enter__(self) -> LiteRTConverter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LiteRTConverter:
        """Create the venv if needed and start the worker now (fail early, before expensive work)."""
        if self._proc is None:
            self._start()
        return self

    def _start(self) -> subprocess.Popen[str]:
        python = ensure_env()
        self._shim = tempfile.TemporaryDirectory(prefix="evit-litert-")
        # only evit itself on the path: the main venv's site-packages would break the converter's pins
        (Path(self._shim.name) / "evit").symlink_to(Path(evit.__file__).resolve().parent)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=self._shim.name, PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.Popen([str(python), "-m", "evit.formats.litert_worker"], cwd=self._shim.name, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        self._proc = proc
        self._answer("starting the converter")
        return proc

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-40]

    def _answer(self, what: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(timeout=30)
            tail = "\n".join(self._stderr[-15:])
            self._proc = None
            raise LiteRTError(f"the LiteRT converter process exited (status {code}) while {what}:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise LiteRTError(f"LiteRT conversion failed while {what}: {answer.get('error')}\n"
                              + "\n".join(self._stderr[-8:]))
        return answer

    def _request(self, req: dict[str, Any], what: str) -> float:
        return float(self._call(req, what).get("seconds", 0.0))

    def _call(self, req: dict[str, Any], what: str) -> dict[str, Any]:
        proc = self._proc or self._start()
        assert proc.stdin is not None
        timer = threading.Timer(self.timeout_s, proc.kill)
        timer.start()
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            answer = self._answer(what)
        finally:
            timer.cancel()
        self.conversions += 1
        self.seconds += float(answer.get("seconds", 0.0))
        return answer

    def convert_subnet(self, arch_json: Path, weights: Path, space: dict[str, Any], out: Path) -> Path:
        """arch JSON + safetensors (+ space) -> `out` (.tflite, fp32, one signature)."""
        # absolute paths: the worker runs in its own directory, not this process's
        s = self._request({"op": "subnet", "arch_json": str(Path(arch_json).resolve()),
                           "weights": str(Path(weights).resolve()), "space": space, "out": str(Path(out).resolve())},
                          f"converting {weights}")
        log.info("converted %s to LiteRT in %.1f s", weights.parent, s)
        return out

    def convert_subnet_int8(self, arch_json: Path, weights: Path, space: dict[str, Any], calibration: np.ndarray,
                            out: Path) -> dict[str, Any]:
        """arch JSON + safetensors (+ space) -> `out` (.tflite, int8): PT2E static quantization
        with litert-torch's quantizer and evit's float policy
        (`evit.formats.litert_worker.litert_quantizer`), activation scales from `calibration` (N, 3, R, R float32), converted in STATIC QDQ mode.
        Returns the quantization report (`QuantReport.to_dict()`)."""
        if calibration.ndim != 4 or calibration.shape[0] == 0:
            raise LiteRTError(f"int8 calibration needs a (N, 3, R, R) batch with N >= 1, got shape {calibration.shape}")
        with tempfile.TemporaryDirectory(prefix="evit-calib-") as tmp:
            calib = Path(tmp) / "calibration.npy"
            np.save(calib, np.ascontiguousarray(calibration, dtype=np.float32))
            answer = self._call({"op": "subnet_int8", "arch_json": str(Path(arch_json).resolve()),
                                 "weights": str(Path(weights).resolve()), "space": space, "calibration": str(calib),
                                 "out": str(Path(out).resolve())}, f"converting {weights} to int8")
        log.info("converted %s to LiteRT int8 in %.1f s", Path(weights).parent, float(answer.get("seconds", 0.0)))
        return dict(answer["report"])

    def convert_programs(self, programs: Sequence[tuple[str, Path, Sequence[Sequence[int]]]], out: Path,
                         int8_calibration: int = 0) -> Path:
        """Several (signature name, .pt2 file from `torch.export.save`, input shapes) -> one .tflite.
        `int8_calibration` > 0: each program quantized int8 first
        (`litert_worker.litert_quantizer`), its activation scales from that many seeded standard-normal inputs of its own shape (a
        latency table's blocks: see evit.latency.devices.litert)."""
        req: dict[str, Any] = {"op": "programs", "out": str(Path(out).resolve()),
                               "programs": [{"name": n, "pt2": str(Path(p).resolve()),
                                             "input_shapes": [list(s) for s in shapes]} for n, p, shapes in programs]}
        if int8_calibration:
            req["int8_calibration"] = int(int8_calibration)
        self._request(req, f"converting {len(programs)} programs into {out.name}")
        return out

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc = None
        if self._shim is not None:
            self._shim.cleanup()
            self._shim = None


def interpreter(path: str | os.PathLike[str], threads: int = 1) -> Any:
    """A LiteRT interpreter on `path` with its default XNNPACK delegate and `threads` threads."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads)


def signature_runner(interp: Any, name: str | None = None) -> tuple[Any, str]:
    """(runner, input name) of one signature (the only one when `name` is None)."""
    sigs = interp.get_signature_list()
    if name is None:
        name = next(iter(sigs))
    runner = interp.get_signature_runner(name)
    return runner, sigs[name]["inputs"][0]


class TfliteRunner:
    """A file's (single) signature, loaded once, run over batches one sample at a time (evit's
    files are converted at batch 1): how a whole split is scored through the LiteRT interpreter."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        self._runner, self._input = signature_runner(interpreter(path, threads))

    def __call__(self, x: Any) -> Any:
        import torch

        outs = [np.asarray(next(iter(self._runner(**{self._input: np.ascontiguousarray(xi.numpy(), dtype=np.float32)})
                                       .values()))) for xi in x.cpu().split(1)]
        return torch.from_numpy(np.concatenate(outs))


def run_tflite(path: str | os.PathLike[str], x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One inference of the file's (single) signature on `x`."""
    runner, in_name = signature_runner(interpreter(path, threads))
    out = runner(**{in_name: np.ascontiguousarray(x, dtype=np.float32)})
    return np.asarray(next(iter(out.values())))


def full_delegation(path: str | os.PathLike[str], threads: int = 1) -> tuple[bool, str]:
    """(fully delegated, tool output) from LiteRT's benchmark tool with `--require_full_delegation`."""
    cmd = [sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model", f"--model={path}",
           f"--num_threads={threads}", "--num_runs=2", "--warmup_runs=1", "--require_full_delegation"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    return proc.returncode == 0 and re.search(r"Fully accelerated:\s+True", text) is not None, text


def delegation_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{"partitions": XNNPACK delegate partitions, "outside_ops": op -> count left on LiteRT's
    own kernels} of a .tflite, read from the interpreter after the default delegate is applied
    (the execution plan ends in one DELEGATE node per partition; an op is outside when a model
    output depends on it without a DELEGATE node in between)."""
    interp = interpreter(path)
    interp.allocate_tensors()
    ops = interp._get_ops_details()  # the interpreter's only view of the delegated plan
    producer: dict[int, dict[str, Any]] = {}
    for op in ops:  # DELEGATE nodes come last: they win over the ops they replaced
        for t in op["outputs"]:
            producer[int(t)] = op
    outside: dict[str, int] = {}
    seen_tensors: set[int] = set()
    seen_ops: set[int] = set()
    stack = [int(d["index"]) for d in interp.get_output_details()]
    while stack:
        t = stack.pop()
        if t in seen_tensors or t not in producer:
            continue
        seen_tensors.add(t)
        op = producer[t]
        if op["index"] in seen_ops:
            continue
        seen_ops.add(op["index"])
        if op["op_name"] != "DELEGATE":
            outside[op["op_name"]] = outside.get(op["op_name"], 0) + 1
        stack.extend(int(i) for i in op["inputs"] if i >= 0)
    return {"partitions": sum(op["op_name"] == "DELEGATE" for op in ops), "outside_ops": outside}


def export_pt2(modules: dict[str, tuple[nn.Module, tuple[int, ...]]],
               folder: Path) -> list[tuple[str, Path, list[tuple[int, ...]]]]:
    """Modules -> `torch.export` programs saved as .pt2 in `folder` (what the LiteRT converter reads)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    programs = []
    with torch.no_grad():
        for name, (m, shape) in modules.items():
            ep = torch.export.export(m.eval(), (seeded_input(shape),))
            pt2 = folder / f"{name}.pt2"
            torch.export.save(ep, str(pt2))
            programs.append((name, pt2, [shape]))
    return programs


def convert_modules(converter: LiteRTConverter, modules: dict[str, tuple[nn.Module, tuple[int, ...]]],
                    path: Path, int8_calibration: int = 0) -> None:
    """Modules (name -> (module, input shape)) -> one .tflite with a signature each, via .pt2
    files (`int8_calibration` > 0: int8, see `LiteRTConverter.convert_programs`)."""
    with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp:
        converter.convert_programs(export_pt2(modules, Path(tmp)), path, int8_calibration)
