"""Training throughput per sampler, and the elastic / complexity step-time ratio.

    .venv/bin/python bench/bench_train.py                      # CPU default (cpu space, batch 32, 1 thread)
    .venv/bin/python bench/bench_train.py --space imagenet --classes 1000 --device cuda \
        --amp bfloat16 --batch 128 --threads 0 --data-resolution 224   # paper scale on a GPU

Every sampler trains its own copy of the same initial supernet with the real training
step (`StepRunner`: forward/backward of every draw, alpha-divergence, bank scoring from
the training logits, periodic re-scoring, AGC, AdamW), on synthetic data at the space's
largest resolution. The samplers run interleaved, one step each in turn, so that a
noisy shared machine slows them alike; `complexity` and `elastic` share the level walk
(same seed), so they train the same FLOPs level at every step. Warm-up steps (not timed)
let the elastic banks fill past half so that exploit draws and the preference rule run.

Prints images/s per sampler (images of the batch per second; each image passes through
every subnet of the step), MFLOPs per step, and the ratio of elastic to complexity
step time (goal: <= 1.10).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit.config import TrainParams  # noqa: E402
from evit.space import get_space  # noqa: E402
from evit.train.loop import NO_DECAY_PATTERNS, _rescore_positions  # noqa: E402
from evit.train.samplers import make_sampler, settings_from_params  # noqa: E402
from evit.train.step import StepConfig, StepRunner, score_archs  # noqa: E402

AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="cpu")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="float32", choices=sorted(AMP))
    ap.add_argument("--batch", type=int, default=TrainParams().batch_size)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per sampler")
    ap.add_argument("--warmup", type=int, default=40, help="untimed steps first (fills the banks)")
    ap.add_argument("--steps-per-epoch", type=int, default=39,
                    help="sets the re-scoring cadence (digits default: 1259 train images / 32 = 39)")
    ap.add_argument("--samplers", default="uniform,complexity,elastic")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 = params.yaml's train.threads")
    ap.add_argument("--data-resolution", type=int, default=0,
                    help="side of the synthetic batch, resized to each subnet's (default: the space's largest)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.utils import adaptive_clip_grad

    from evit.nn.supernet import Supernet

    device = torch.device(args.device)
    space = get_space(args.space, num_classes=args.classes)
    t = TrainParams()
    torch.manual_seed(0)
    base = Supernet(space).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    res = args.data_resolution or max(space.resolutions)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch, 3, res, res, generator=g), torch.randint(0, args.classes, (args.batch,), generator=g))
            for _ in range(8)]
    total = args.warmup + args.steps
    names = args.samplers.split(",")
    runs = {}
    cfg = StepConfig(label_smoothing=t.label_smoothing, amp_dtype=AMP[args.amp] if device.type == "cuda" else None,
                     channels_last=channels_last)
    for name in names:
        model = copy.deepcopy(base)
        groups = param_groups_weight_decay(model, t.weight_decay, no_weight_decay_list=NO_DECAY_PATTERNS)
        opt = create_optimizer_v2(groups, opt="adamw", lr=t.lr, weight_decay=t.weight_decay)
        runs[name] = {"model": model, "opt": opt,
                      "sampler": make_sampler(name, space, 0, total, settings_from_params(t)),
                      "runner": StepRunner(model, space, cfg, device), "times": [], "flops": []}
    rescore_at = _rescore_positions(args.steps_per_epoch, t.rescore_per_epoch)

    def one_step(r: dict, i: int) -> tuple[float, float]:
        x, y = data[i % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        draws = r["sampler"].step(i)
        res_ = r["runner"].run(x, y, draws)
        r["sampler"].observe(i, [(d.draw, d.hard_ce) for d in res_])
        if i % args.steps_per_epoch in rescore_at:
            stale = r["sampler"].stale_entries(draws[0].level, t.rescore_entries)
            if stale:
                for arch, ce in zip(stale, score_archs(r["model"], r["runner"], x, y, stale)):
                    r["sampler"].rescore(i, draws[0].level, arch, ce)
        adaptive_clip_grad(r["model"].parameters(), clip_factor=t.agc_clip)
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(d.flops_m for d in res_)

    for i in range(total):
        for name in names:
            dt, fl = one_step(runs[name], i)
            if i >= args.warmup:
                runs[name]["times"].append(dt)
                runs[name]["flops"].append(fl)
    out = {"space": args.space, "device": str(device), "amp": args.amp, "batch": args.batch, "resolution": res,
           "threads": torch.get_num_threads(), "timed_steps": args.steps, "samplers": {}}
    print(f"space={args.space} device={device} amp={args.amp} batch={args.batch} res={res} "
          f"threads={torch.get_num_threads()} timed steps={args.steps} (after {args.warmup} warm-up)")
    for name in names:
        r = runs[name]
        mean_t = statistics.fmean(r["times"])
        s = r["sampler"]
        fill = {lv: len(b) for lv, b in s.banks.items()}
        out["samplers"][name] = {"step_s": mean_t, "median_step_s": statistics.median(r["times"]),
                                 "images_per_s": args.batch / mean_t, "mflops_per_step": statistics.fmean(r["flops"]),
                                 "bank_sizes": fill}
        print(f"  {name:<10} {args.batch / mean_t:9.1f} images/s   step {mean_t * 1000:8.1f} ms "
              f"(median {statistics.median(r['times']) * 1000:.1f})   {statistics.fmean(r['flops']):8.2f} MFLOPs/step"
              + (f"   bank sizes {fill}" if fill else ""))
    if "elastic" in runs and "complexity" in runs:
        e, c = out["samplers"]["elastic"], out["samplers"]["complexity"]
        ratio = e["step_s"] / c["step_s"]
        per_flop = (e["step_s"] / e["mflops_per_step"]) / (c["step_s"] / c["mflops_per_step"])
        med = e["median_step_s"] / c["median_step_s"]
        out.update(elastic_over_complexity=ratio, elastic_over_complexity_median=med,
                   elastic_over_complexity_per_mflop=per_flop)
        print(f"elastic / complexity step time: {ratio:.3f} (median {med:.3f}; per MFLOP {per_flop:.3f}); "
              f"goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
