"""Training throughput per sampler, and the elastic / complexity step-time ratio.

    .venv/bin/python bench/bench_train.py                      # CPU default (cpu space, batch 32, 1 thread)
    .venv/bin/python bench/bench_train.py --space imagenet --classes 1000 --device cuda \
        --amp bfloat16 --batch 128 --threads 0 --data-resolution 224   # paper scale on a GPU

Every sampler trains its own copy of the same initial supernet with the real training
step (`StepRunner`: forward/backward of every draw, alpha-divergence, then
`observe_step`: bank scores and the re-scoring passes each elastic variant asks for, at
its own moments: `elastic` re-scores every bank at each epoch start and the current one
at the quarters; AGC, AdamW), on synthetic data at the space's largest resolution. The
samplers run interleaved, one step each in turn, so that a noisy shared machine slows
them alike; `complexity` and the elastic samplers share the level walk (same seed), so
they train the same FLOPs level at every step. Warm-up steps (not timed) let the banks
fill; the timed steps span whole epochs (`--steps-per-epoch`), so the epoch-start
re-scoring is paid in proportion.

Prints images/s per sampler (images of the batch per second; each image passes through
every subnet of the step), MFLOPs per step, and the ratio of each elastic variant's to
complexity's step time.
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

from evit.config import TrainParams
from evit.space import get_space
from evit.train.loop import NO_DECAY_PATTERNS
from evit.train.sampler_factory import make_sampler
from evit.train.step import StepConfig, StepRunner, observe_step

AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="cpu")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="float32", choices=sorted(AMP))
    ap.add_argument("--batch", type=int, default=TrainParams().batch_size)
    ap.add_argument("--steps", type=int, default=78, help="timed steps per sampler (default: 2 epochs)")
    ap.add_argument("--warmup", type=int, default=117, help="untimed steps first (fills the banks; default: 3 epochs)")
    ap.add_argument("--steps-per-epoch", type=int, default=39,
                    help="sets the re-scoring cadence (digits default: 1259 train images / 32 = 39)")
    ap.add_argument("--samplers", default="uniform,complexity,elastic,elastic-compressed")
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
                      "sampler": make_sampler(name, space, 0, train=t, steps_per_epoch=args.steps_per_epoch,
                                              total_steps=total),
                      "runner": StepRunner(model, space, cfg, device), "times": [], "flops": []}
    for r in runs.values():
        r["sampler"].scores_from_training = True  # no mixup here, as the loop decides

    def one_step(r: dict, i: int) -> tuple[float, float]:
        x, y = data[i % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        draws = r["sampler"].step(i)
        res_ = r["runner"].run(x, y, draws)
        observe_step(r["sampler"], r["model"], r["runner"], x, y, i, res_)
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
        print(f"  {name:<18} {args.batch / mean_t:9.1f} images/s   step {mean_t * 1000:8.1f} ms "
              f"(median {statistics.median(r['times']) * 1000:.1f})   {statistics.fmean(r['flops']):8.2f} MFLOPs/step"
              + (f"   bank sizes {fill}" if fill else ""))
    for variant in ("elastic", "elastic-compressed"):
        if variant not in runs or "complexity" not in runs:
            continue
        e, c = out["samplers"][variant], out["samplers"]["complexity"]
        ratio = e["step_s"] / c["step_s"]
        per_flop = (e["step_s"] / e["mflops_per_step"]) / (c["step_s"] / c["mflops_per_step"])
        med = e["median_step_s"] / c["median_step_s"]
        out[f"{variant}_over_complexity"] = {"mean": ratio, "median": med, "per_mflop": per_flop}
        print(f"{variant} / complexity step time: {ratio:.3f} (median {med:.3f}; per MFLOP {per_flop:.3f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
