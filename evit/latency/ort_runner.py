"""A stand-alone benchmark runner for the `command` device kind (and an example of one).

    python -m evit.latency.ort_runner MODEL.onnx --input-shape 1,3,32,32 --threads 1

loads the ONNX file with onnxruntime, warms up, times `--repeats` runs and prints the
median latency in milliseconds as the last line of stdout, which is the contract of a
`command` device (see `evit.latency.devices.CommandDevice`). A device template using it:

    command: "python -m evit.latency.ort_runner {model} --input-shape {input_shape} --threads {threads}"

A phone or board runner follows the same contract (e.g. a script that pushes {model}
with adb, runs TFLite's `benchmark_model` and prints its average in ms). It imports
nothing from evit, so it can be copied to a remote machine as a single file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="ONNX file")
    ap.add_argument("--input-shape", required=True, help="comma-separated, e.g. 1,3,32,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    shape = tuple(int(s) for s in args.input_shape.split(","))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(args.model, sess_options=so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(args.warmup):
        sess.run(None, feed)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    sys.stdout.write(f"median latency (ms): {statistics.median(times):.6f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
