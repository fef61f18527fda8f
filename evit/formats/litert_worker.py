"""LiteRT converter worker: runs inside the converter venv (evit.formats.litert_env), never imported by evit.

A long-lived process: one JSON request per line on stdin, one JSON answer per line on
the protocol pipe (the original stdout; the converter's own prints go to stderr). It
imports only the torch-level part of evit (the bundle loader: arch, space, blocks,
nn.static), which needs torch, numpy, timm and safetensors, all pinned in
requirements-litert.lock.

Requests:
- {"op": "subnet", "arch_json": PATH, "weights": PATH, "space": {...}, "out": PATH}:
  the static subnet rebuilt from its arch JSON + safetensors, converted with one
  signature `serving_default` taking `image` (1, 3, R, R).
- {"op": "subnet_int8", ..., "calibration": PATH.npy, "out": PATH}: the same subnet
  quantized int8 (`evit.formats.quantize.litert_quantizer`: litert-torch's PT2EQuantizer
  with evit's float policy, calibrated on the (N, 3, R, R) images), converted in STATIC
  QDQ mode; the answer carries the quantization report ("report").
- {"op": "programs", "programs": [{"name": N, "pt2": PATH, "input_shapes": [[...]]}], "out": PATH}:
  several `torch.export`ed programs (plain .pt2 archives: graph + weights, no pickles)
  in one file, one signature each, so a latency table converts a batch of blocks per
  converter call; with "int8_calibration": N, each program quantized int8 first
  (`litert_quantizer`, N seeded standard-normal calibration inputs of its own shape).
Answer: {"ok": true, "seconds": S, ...} or {"ok": false, "error": TEXT}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any


def _atomic_export(model: Any, out: str) -> None:
    tmp = f"{out}.tmp{os.getpid()}"
    model.export(tmp)
    os.replace(tmp, out)


def _subnet(req: dict[str, Any]) -> None:
    import litert_torch
    import torch

    from evit.formats.bundle import load_static_files

    net = load_static_files(req["arch_json"], req["weights"], req["space"])
    x = torch.zeros(1, 3, net.arch.resolution, net.arch.resolution)
    _atomic_export(litert_torch.convert(net, (x,)), req["out"])


def litert_quantizer() -> Any:
    """litert-torch's PT2EQuantizer with evit's float policy and float input / output
    (`evit.formats.quantize.policy_quantizer`): symmetric per-channel int8 weights, static
    per-tensor int8 activations. Here, not in evit.formats.quantize: only this module may
    import litert-torch."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )

    from evit.formats.quantize import policy_quantizer

    return policy_quantizer(PT2EQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False),
                            float_io=True)


def _subnet_int8(req: dict[str, Any]) -> dict[str, Any]:
    import litert_torch
    import numpy as np
    import torch
    from litert_torch.quantize.quant_config import QuantConfig

    from evit.formats.bundle import load_static_files
    from evit.formats.quantize import (
        litert_int8_forms,
        quantization_report,
        quantize_int8,
    )

    net = litert_int8_forms(load_static_files(req["arch_json"], req["weights"], req["space"]).eval())
    x = torch.zeros(1, 3, net.arch.resolution, net.arch.resolution)
    calibration = torch.from_numpy(np.load(req["calibration"]))
    quantizer = litert_quantizer()
    graph = quantize_int8(net, x, [calibration], quantizer, fold_quantize=False)
    report = quantization_report(graph, int(calibration.shape[0])).to_dict()
    _atomic_export(litert_torch.convert(graph, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)), req["out"])
    return {"report": report}


def _programs(req: dict[str, Any]) -> None:
    import litert_torch
    import torch

    conv = litert_torch.Converter()
    n_calib = int(req.get("int8_calibration", 0))
    quantizer = None
    if n_calib:
        from evit.formats.inputs import seeded_input
        from evit.formats.quantize import quantize_int8

        quantizer = litert_quantizer()
    for item in req["programs"]:
        ep = torch.export.load(item["pt2"])
        args = tuple(torch.zeros(s) for s in item["input_shapes"])
        module = ep.module()
        if quantizer is not None:
            calib = seeded_input((n_calib, *item["input_shapes"][0][1:]), seed=1)
            module = quantize_int8(module, args[0], [calib], quantizer, fold_quantize=False)
        conv.signature(item["name"], module, args)
    if quantizer is None:
        _atomic_export(conv.convert(), req["out"])
    else:
        from litert_torch.quantize.quant_config import QuantConfig

        _atomic_export(conv.convert(quant_config=QuantConfig(pt2e_quantizer=quantizer)), req["out"])


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the converter prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(int(os.environ.get("EVIT_LITERT_THREADS", "1")))
    proto.write(json.dumps({"ok": True, "ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.monotonic()
        try:
            req = json.loads(line)
            extra = {"subnet": _subnet, "subnet_int8": _subnet_int8, "programs": _programs}[req["op"]](req)
            answer = {"ok": True, "seconds": round(time.monotonic() - t0, 3), **(extra or {})}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who raises
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
