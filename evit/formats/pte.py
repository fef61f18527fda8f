"""ExecuTorch (.pte) export: a static subnet (or block) lowered to XNNPACK, and run back.

`export_pte` traces the eval-mode module with `torch.export`, hands every node XNNPACK
can take to the XNNPACK delegate (`to_edge_transform_and_lower` with the
`XnnpackPartitioner`), and writes the ExecuTorch program atomically. The lowering report
(`Delegation`) says how many delegate partitions the program has and which operators
stayed outside: the export-friendly static subnets (evit.nn.static) lower to one or two
partitions with only constant dtype/layout copies outside.

Several modules can share one file (`export_pte_methods`): each becomes a named method
of one program, so a latency table lowers and loads hundreds of blocks at the cost of a
few files. With `int8_calibration`, each module is first quantized by the one int8
function (`evit.formats.quantize.quantize_int8`: PT2E, XNNPACK quantizer, per-channel
static) and the report adds which ops run int8 and which stayed float.
`load_program` / `run_pte` execute a program with the ExecuTorch runtime in
this process (the same XNNPACK kernels a phone's `executor_runner` uses).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evit.io import atomic_path

log = logging.getLogger(__name__)

_NON_COMPUTE = ("getitem", "executorch_call_delegate", "_to_dim_order_copy", "alloc")
"""Graph nodes that are not compute: delegate calls, tuple access, and the dtype/layout
copies of 0-d constants that edge lowering inserts for scalar operands (run once per call
on one element)."""


@dataclass(frozen=True)
class Delegation:
    """How a program was lowered: delegate partitions and the operators left outside."""

    partitions: int
    outside: dict[str, int]
    """Compute operators not delegated (name -> count); empty when XNNPACK took everything."""
    quantization: dict[str, Any] | None = None
    """int8 programs: `evit.formats.quantize.QuantReport.to_dict` (policy, int8 / float ops)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"partitions": self.partitions, "outside_ops": dict(self.outside)}
        if self.quantization is not None:
            d["quantization"] = self.quantization
        return d


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(name).split(":")[0].replace("<EdgeOpOverload: ", "").strip("<>")


def delegation(edge_program: Any) -> Delegation:
    """Partitions and non-delegated compute ops of one lowered (edge) exported program."""
    partitions, outside = 0, Counter()
    for node in edge_program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            partitions += 1
        elif not any(k in name for k in _NON_COMPUTE):
            outside[name] += 1
    return Delegation(partitions, dict(outside))


def _lower(programs: Mapping[str, Any]) -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()])


def export_pte_methods(modules: Mapping[str, tuple[nn.Module, torch.Tensor]],
                       path: str | os.PathLike[str], *,
                       int8_calibration: Mapping[str, Sequence[torch.Tensor]] | None = None) -> dict[str, Delegation]:
    """Lower several eval-mode modules (name -> (module, example input)) into one .pte.

    Each becomes a method named after its key (`forward` for a single whole model).
    `int8_calibration` (name -> calibration inputs, for every module): quantize each module
    to int8 first (`quantize_int8`). Returns the delegation report per method.
    """
    from evit.formats.quantize import quantization_report, quantize_int8

    path = Path(path)
    quant: dict[str, dict[str, Any]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = {}
        for name, (module, example) in modules.items():
            if int8_calibration is not None:
                calib = list(int8_calibration[name])
                converted = quantize_int8(module, example, calib)  # traced in eval mode already
                quant[name] = quantization_report(converted, sum(int(x.shape[0]) for x in calib)).to_dict()
                eps[name] = torch.export.export(converted, (example,))
                continue
            was = module.training
            module.eval()
            try:
                eps[name] = torch.export.export(module, (example,))
            finally:
                module.train(was)
        edge = _lower(eps)
        report = {name: replace(delegation(edge.exported_program(name)), quantization=quant.get(name)) for name in modules}
        program = edge.to_executorch()
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(program.buffer)
    log.info("exported ExecuTorch program (%d method(s)) to %s", len(modules), path)
    return report


def export_pte(module: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], *,
               int8_calibration: Sequence[torch.Tensor] | None = None) -> Delegation:
    """Lower one module (eval mode) to an XNNPACK ExecuTorch program with method `forward`
    (int8 when `int8_calibration` inputs are given)."""
    calib = None if int8_calibration is None else {"forward": int8_calibration}
    return export_pte_methods({"forward": (module, example)}, path, int8_calibration=calib)["forward"]


def set_threads(n: int) -> None:
    """Threads of the ExecuTorch runtime's shared XNNPACK thread pool (process-wide).

    Call it before loading methods: resizing the pool while methods are loaded aborts the
    process (the runtime's own warning: `_unsafe_reset_threadpool`).
    """
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


def load_program(path: str | os.PathLike[str]) -> Any:
    """The loaded program; keep it referenced while its methods run (they use its memory)."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path))


class PteRunner:
    """A program's `forward`, loaded once, run over batches one sample at a time (evit's
    programs are traced at batch 1): how a whole split is scored through the runtime."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        set_threads(threads)
        self._program = load_program(path)
        self._method = self._program.load_method("forward")  # runs in the program's memory: keep both

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._method.execute([xi.contiguous()])[0].clone() for xi in x.split(1)])


def run_pte(path: str | os.PathLike[str], x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """One inference of the program's `forward` on `x`."""
    set_threads(threads)
    program = load_program(path)
    method = program.load_method("forward")
    out = method.execute([x.contiguous()])[0].clone()
    del method, program
    return out
