"""Supernet slicing overhead: forward+backward time of the supernet running a subnet vs the
extracted static subnet, same batch, measured interleaved in one run.

Prints, per arch, both median step times and `ratio = static_time / supernet_time`
(goal: >= 0.7, i.e. the supernet is at least 0.7x as fast as the static subnet), then
one JSON line with all results. Defaults: 3 uniform archs of the `cpu` space at batch 64
and 1 arch of the `imagenet` space at batch 8, on 1 CPU thread.

    .venv/bin/python bench/bench_supernet.py [--threads 1] [--repeats 10] [--device cpu] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from evit.arch import Arch
from evit.flops import count
from evit.nn.static import extract
from evit.nn.supernet import Supernet
from evit.space import CPU, IMAGENET, SearchSpace


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], x: torch.Tensor,
             y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    return step


def bench_arch(space: SearchSpace, arch: Arch, batch: int, repeats: int, warmup: int,
               device: torch.device, channels_last: bool = False) -> dict[str, object]:
    torch.manual_seed(0)
    supernet = Supernet(space).to(device).train()
    static = extract(supernet, arch).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, arch.resolution, arch.resolution, generator=gen).to(device)
    y = torch.randint(0, space.num_classes, (batch,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        supernet.to(memory_format=torch.channels_last)
        static.to(memory_format=torch.channels_last)
    steps = {
        "supernet": _step_fn(lambda t: supernet(t, arch), list(supernet.parameters()), x, y),
        "static": _step_fn(static, list(static.parameters()), x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    sup = statistics.median(times["supernet"])
    sta = statistics.median(times["static"])
    return {"space": space.name, "arch": arch.key, "batch": batch, "flops_m": round(count(arch, space).flops_m, 2),
            "supernet_ms": round(sup * 1e3, 2), "static_ms": round(sta * 1e3, 2), "ratio": round(sta / sup, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu-archs", type=int, default=3)
    ap.add_argument("--cpu-batch", type=int, default=64)
    ap.add_argument("--imagenet-batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true", help="NHWC inputs and weights (as training uses)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    jobs = [(CPU, CPU.sample_uniform(rng), args.cpu_batch) for _ in range(args.cpu_archs)]
    jobs.append((IMAGENET, IMAGENET.sample_uniform(rng), args.imagenet_batch))
    results = []
    print(f"{'space':9} {'batch':>5} {'MFLOPs':>8} {'supernet ms':>12} {'static ms':>10} {'ratio':>6}  arch")
    for space, arch, batch in jobs:
        r = bench_arch(space, arch, batch, args.repeats, args.warmup, device, args.channels_last)
        results.append(r)
        print(f"{r['space']:9} {r['batch']:>5} {r['flops_m']:>8} {r['supernet_ms']:>12} {r['static_ms']:>10} "
              f"{r['ratio']:>6}  {r['arch']}", flush=True)
    worst = min(float(r["ratio"]) for r in results)  # type: ignore[arg-type]
    print(json.dumps({"bench": "supernet_vs_static", "threads": args.threads, "device": str(device),
                      "channels_last": args.channels_last,
                      "min_ratio": worst, "goal": 0.7, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
