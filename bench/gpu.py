"""GPU benchmark of a paper-scale run, ready to run: one call, one table, under 8 minutes.

    python bench/gpu.py                        # on a CUDA machine: paper space, 1,000 classes, 224 px
    python bench/gpu.py --json gpu.json        # also keep the numbers
    python bench/gpu.py --tiny                 # CPU smoke run at tiny sizes (what tests/test_bench_gpu.py runs)

Measures, on the paper search space (`imagenet` preset, 1,000 classes):
1. supernet training throughput (images/s; each image goes through the step's 4 subnets,
   forward and backward, plus AGC and AdamW) per sampler (uniform / complexity / elastic),
   batch 96 per GPU (the reference's), input at 224 px resized to each subnet's sampled
   resolution, bf16 autocast, channels-last; eager with the explicit softmax attention,
   eager with `scaled_dot_product_attention` (relative-position bias as additive mask),
   and `torch.compile` (with the SDPA path); peak GPU memory of each;
2. the loader beside it: images/s of one DataLoader worker for `shards` data with the
   paper's train transform (bench/bench_loader.py, on generated 500x375 JPEGs) and the
   workers a GPU needs to keep up with the fastest training configuration;
3. search fitness throughput: subnets/min, each BN-recalibrated (search.bn_calib_batches
   x search.eval_batch_size images) and evaluated in fp32 (as `evit search` does) on a
   10,000-image split (synthetic tensors on the device: the data path is item 2's).

Every configuration gets a wall-clock budget (`--config-seconds`, `--compile-seconds`)
and the run a total one (`--max-minutes`): what does not fit is printed as skipped,
never silently dropped. torch.compile specialises on each subnet (depths, widths and
resolution change the graph, and a step trains 4 subnets), so a compiled run recompiles
for every new subnet until `--recompile-limit` graphs, then runs new subnets eager; its
warm-up is reported apart and its steady state is what compiling buys this supernet.
Compiling costs minutes, so by default only the elastic sampler (the method's) is
measured compiled, after the eager configurations, the loader and the search
(`--compile-samplers uniform,complexity,elastic` measures all three, given the time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evit.config import TrainParams
from evit.nn.elastic import set_attention_impl
from evit.space import get_space
from evit.train.loop import NO_DECAY_PATTERNS
from evit.train.sampler_factory import make_sampler
from evit.train.step import StepConfig, StepRunner, observe_step

AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclass
class Config:
    sampler: str
    attention: str
    compiled: bool

    @property
    def name(self) -> str:
        return f"{self.sampler}/{'compile' if self.compiled else 'eager'}/{self.attention}"


@dataclass
class Result:
    config: Config
    images_per_s: float | None = None
    step_ms: float | None = None
    warmup_s: float = 0.0
    timed_steps: int = 0
    peak_mem_gib: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(base: torch.nn.Module, space: Any, cfg: Config, args: argparse.Namespace,
                     device: torch.device, data: list[tuple[torch.Tensor, torch.Tensor]], budget_s: float) -> Result:
    """One configuration: `--warmup` untimed steps, then timed steps until `--steps` or the budget."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.utils import adaptive_clip_grad

    t = TrainParams()
    res = Result(cfg)
    model = copy.deepcopy(base)
    set_attention_impl(model, cfg.attention)
    groups = param_groups_weight_decay(model, t.weight_decay, no_weight_decay_list=NO_DECAY_PATTERNS)
    opt = create_optimizer_v2(groups, opt="adamw", lr=t.lr, weight_decay=t.weight_decay)
    total = args.warmup + args.steps
    sampler = make_sampler(cfg.sampler, space, 0, train=t, steps_per_epoch=max(1, args.steps // 2), total_steps=total)
    sampler.scores_from_training = True  # no mixup here: the training CE is the bank score
    if cfg.compiled:
        torch._dynamo.reset()  # a fresh compile cache: earlier configurations' graphs must not count
        torch._dynamo.config.recompile_limit = args.recompile_limit
    runner_model = torch.compile(model, backend=args.compile_backend) if cfg.compiled else model
    runner = StepRunner(runner_model, space, StepConfig(label_smoothing=t.label_smoothing,
                                                        amp_dtype=AMP[args.amp] if device.type == "cuda" else None,
                                                        channels_last=device.type == "cuda"), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    start = time.perf_counter()
    warm_until = args.warmup  # the timed part starts after --warmup steps or 60% of the budget
    for i in range(total):
        if i < warm_until and time.perf_counter() - start > 0.6 * budget_s:
            warm_until = i
            res.note = f"warm-up cut to {i} steps; "
        x, y = data[i % len(data)]
        _sync(device)
        t0 = time.perf_counter()
        draws = sampler.step(i)
        out = runner.run(x, y, draws)
        observe_step(sampler, model, runner, x, y, i, out)
        adaptive_clip_grad(model.parameters(), clip_factor=t.agc_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if i < warm_until:
            res.warmup_s += dt
        else:
            times.append(dt)
        if time.perf_counter() - start > budget_s:
            res.note += f"budget {budget_s:.0f}s reached after {i + 1} steps"
            break
    if times:
        res.step_ms = statistics.fmean(times) * 1000
        res.images_per_s = args.batch / statistics.fmean(times)
        res.timed_steps = len(times)
    elif not res.note:
        res.note = "no timed step"
    if device.type == "cuda":
        res.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    del model, opt, runner, runner_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def search_throughput(base: torch.nn.Module, space: Any, args: argparse.Namespace, device: torch.device,
                      budget_s: float) -> dict[str, Any]:
    """Subnets/min of the search's fitness evaluation: extract, BN recalibration, top-1 in fp32."""
    from evit.evaluate import evaluate_top1, recalibrate_bn
    from evit.nn.static import extract

    rng = random.Random(0)
    archs = sorted((space.sample_uniform(rng) for _ in range(args.search_subnets)), key=lambda a: a.resolution)
    supernet = copy.deepcopy(base).float().eval()
    g = torch.Generator(device=device).manual_seed(0)
    cached: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    done, seconds = 0, 0.0
    for arch in archs:
        r = arch.resolution
        if r not in cached:
            cached.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            calib = torch.randn(args.bn_batches * args.eval_batch, 3, r, r, device=device, generator=g)
            x = torch.randn(args.search_images, 3, r, r, device=device, generator=g)
            y = torch.randint(0, space.num_classes, (args.search_images,), device=device, generator=g)
            cached[r] = (calib, x, y)
        calib, x, y = cached[r]
        _sync(device)
        t0 = time.perf_counter()
        net = extract(supernet, arch).float()
        recalibrate_bn(net, (calib, calib[:, 0, 0, 0]), args.bn_batches, batch_size=args.eval_batch)
        evaluate_top1(net, (x, y), batch_size=args.eval_batch)
        _sync(device)
        seconds += time.perf_counter() - t0
        done += 1
        if seconds > budget_s:
            break
    cached.clear()
    return {"subnets": done, "seconds": seconds, "subnets_per_min": 60.0 * done / seconds if seconds else None,
            "split_images": args.search_images, "calib_images": args.bn_batches * args.eval_batch}


def attention_micro(device: torch.device, amp: torch.dtype | None, repeats: int, tiny: bool) -> dict[str, Any]:
    """Forward + backward of one paper-scale attention layer per path, interleaved; median ms.

    Largest layers of the paper space at 224 px, V-scale 4, batch 96: stage 4 (14x14 tokens,
    width 160, 10 heads) and stage 5 (7x7 tokens, width 288, 18 heads) (tiny: 7x7, width 32).
    """
    from evit.nn.elastic import ElasticAttention

    shapes = [(4, 7, 32, 2)] if tiny else [(96, 14, 160, 4), (96, 7, 288, 4)]
    out: dict[str, Any] = {}
    for batch, side, width, v_scale in shapes:
        attn = ElasticAttention(width, 16, v_scale, side).to(device)
        with torch.no_grad():
            attn.rel_bias.uniform_(-1, 1)
        x = torch.randn(batch, side * side, width, device=device, requires_grad=True)
        times: dict[str, list[float]] = {"explicit": [], "sdpa": []}
        for i in range(repeats + 2):
            for impl in times:
                attn.impl = impl
                _sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                    y = attn(x, side, side, width // 16, v_scale)
                y.float().square().mean().backward()
                _sync(device)
                if i >= 2:
                    times[impl].append(time.perf_counter() - t0)
        e, s = statistics.median(times["explicit"]) * 1000, statistics.median(times["sdpa"]) * 1000
        out[f"b{batch}-{side}x{side}-w{width}"] = {"explicit_ms": e, "sdpa_ms": s, "sdpa_speedup": e / s}
    return out


def loader_throughput(args: argparse.Namespace) -> dict[str, Any]:
    import bench_loader

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker's view
    try:
        with tempfile.TemporaryDirectory(prefix="evit-bench-gpu-") as tmp:
            return bench_loader.measure(Path(tmp), args.loader_images, args.resolution)
    finally:
        torch.set_num_threads(torch_threads)


def loader_and_search(args: argparse.Namespace, base: torch.nn.Module, space: Any, device: torch.device,
                      deadline: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    loader = loader_throughput(args) if time.perf_counter() + 60 < deadline else None
    search_budget = min(args.search_seconds, max(0.0, deadline - time.perf_counter() - args.compile_seconds))
    search = search_throughput(base, space, args, device, search_budget) if search_budget > 0 else None
    return loader, search


def configs(args: argparse.Namespace) -> list[Config]:
    """Eager configurations first (their figures are safe), compiled ones last."""
    out = [Config(s, impl, False) for s in args.samplers.split(",") for impl in ("explicit", "sdpa")]
    if args.compile:
        out += [Config(s, "sdpa", True) for s in args.compile_samplers.split(",")]
    return out


def table(results: list[Result], loader: dict[str, Any] | None, search: dict[str, Any] | None,
          header: str, attention: dict[str, Any] | None = None) -> str:
    lines = [header, f"{'sampler/mode/attention':<30}{'images/s':>10}{'step ms':>10}{'warm-up s':>11}"
             f"{'peak GiB':>10}  note"]
    for r in results:
        ips = f"{r.images_per_s:10.1f}" if r.images_per_s else f"{'-':>10}"
        ms = f"{r.step_ms:10.1f}" if r.step_ms else f"{'-':>10}"
        mem = f"{r.peak_mem_gib:10.2f}" if r.peak_mem_gib is not None else f"{'n/a':>10}"
        lines.append(f"{r.config.name:<30}{ips}{ms}{r.warmup_s:11.1f}{mem}  {r.note}")
    for s in sorted({r.config.sampler for r in results}):
        by = {(r.config.attention, r.config.compiled): r.images_per_s for r in results if r.config.sampler == s}
        e, d, c = by.get(("explicit", False)), by.get(("sdpa", False)), by.get(("sdpa", True))
        parts = []
        if e and d:
            parts.append(f"sdpa/explicit {d / e:.2f}x")
        if d and c:
            parts.append(f"compile/eager {c / d:.2f}x")
        if parts:
            lines.append(f"  {s}: " + ", ".join(parts))
    best = max((r.images_per_s for r in results if r.images_per_s), default=None)
    if loader:
        sh = loader["formats"]["shards"]
        npy = loader["formats"]["npy"]
        lines.append(f"loader, one worker, {loader['resolution']} px: shards train {sh['train_images_per_s']:.1f} "
                     f"img/s, eval {sh['eval_images_per_s']:.1f}; npy train {npy['train_images_per_s']:.1f}, "
                     f"eval {npy['eval_images_per_s']:.1f}")
        if best:
            lines.append(f"  workers to feed the fastest configuration ({best:.0f} img/s): shards "
                         f"{math.ceil(best / sh['train_images_per_s'])}, npy {math.ceil(best / npy['train_images_per_s'])}")
    for shape, a in (attention or {}).items():
        lines.append(f"attention layer fwd+bwd {shape}: explicit {a['explicit_ms']:.2f} ms, sdpa {a['sdpa_ms']:.2f} ms "
                     f"(sdpa {a['sdpa_speedup']:.2f}x)")
    if search:
        spm = search["subnets_per_min"]
        lines.append(f"search fitness (fp32, BN recalibration on {search['calib_images']} + top-1 on "
                     f"{search['split_images']} images): " + (f"{spm:.1f} subnets/min" if spm else "-")
                     + f" ({search['subnets']} subnets in {search['seconds']:.1f}s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    ap.add_argument("--space", default="imagenet")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=96, help="per GPU (the reference's)")
    ap.add_argument("--resolution", type=int, default=224, help="input side, resized to each subnet's")
    ap.add_argument("--amp", default="bfloat16", choices=sorted(AMP))
    ap.add_argument("--samplers", default="uniform,complexity,elastic")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-samplers", default="elastic",
                    help="samplers measured compiled (each compile costs minutes: add the others with time to spare)")
    ap.add_argument("--compile-seconds", type=float, default=100.0, help="budget of a compiled configuration")
    ap.add_argument("--recompile-limit", type=int, default=4,
                    help="dynamo graphs per configuration (one per new subnet shape); then new subnets run eager")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config-seconds", type=float, default=20.0)
    ap.add_argument("--max-minutes", type=float, default=7.5, help="stop starting new measurements after this")
    ap.add_argument("--search-images", type=int, default=10_000)
    ap.add_argument("--search-subnets", type=int, default=12)
    ap.add_argument("--search-seconds", type=float, default=60.0)
    ap.add_argument("--bn-batches", type=int, default=32, help="search.bn_calib_batches (imagenet profile)")
    ap.add_argument("--eval-batch", type=int, default=512, help="search.eval_batch_size (imagenet profile)")
    ap.add_argument("--loader-images", type=int, default=192)
    ap.add_argument("--attention-repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke sizes: cpu space, batch 4, 32 px, 2+2 steps, eager compile backend")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.__dict__.update(space="cpu", classes=10, batch=4, resolution=32, warmup=1, steps=2, config_seconds=60,
                             search_images=16, search_subnets=2, bn_batches=1, eval_batch=8, loader_images=12,
                             compile_backend="eager", compile_seconds=60, amp="float32", attention_repeats=2, max_minutes=60.0)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    from evit.nn.supernet import Supernet

    space = get_space(args.space, num_classes=args.classes)
    torch.manual_seed(0)
    base = Supernet(space).to(device)
    if device.type == "cuda":
        base = base.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g).to(device),
             torch.randint(0, args.classes, (args.batch,), generator=g).to(device)) for _ in range(4)]
    deadline = t_start + args.max_minutes * 60
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"evit bench/gpu.py: {gpu}, torch {torch.__version__}, space {args.space} ({args.classes} classes), "
              f"batch {args.batch}, {args.resolution} px, amp {args.amp if device.type == 'cuda' else 'off (cpu)'}, "
              f"channels-last {device.type == 'cuda'}, {args.warmup}+{args.steps} steps per configuration")
    print(header, flush=True)

    attention = attention_micro(device, AMP[args.amp] if device.type == "cuda" else None, args.attention_repeats,
                                args.tiny)
    for shape, a in attention.items():
        print(f"  attention {shape}: sdpa {a['sdpa_speedup']:.2f}x explicit", flush=True)
    results: list[Result] = []
    loader = search = None
    all_configs = configs(args)
    for k, cfg in enumerate(all_configs):
        if cfg.compiled and not any(c.compiled for c in all_configs[:k]):
            # loader and search before the first compiled configuration: a compile can overrun its budget
            loader, search = loader_and_search(args, base, space, device, deadline)
        budget = args.compile_seconds if cfg.compiled else args.config_seconds
        budget = min(budget, deadline - time.perf_counter())
        if budget < min(10.0, args.config_seconds):
            results.append(Result(cfg, note="skipped: --max-minutes"))
            continue
        try:
            r = train_throughput(base, space, cfg, args, device, data, budget)
        except Exception as exc:  # one failing configuration (e.g. a compile error) must not lose the table
            r = Result(cfg, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
        results.append(r)
        print(f"  {cfg.name}: " + (f"{r.images_per_s:.1f} images/s" if r.images_per_s else "-") + f" {r.note}",
              flush=True)
    if not any(c.compiled for c in all_configs):
        loader, search = loader_and_search(args, base, space, device, deadline)
    text = table(results, loader, search, header, attention)
    print("\n" + text + f"\n(total {time.perf_counter() - t_start:.0f}s)", flush=True)
    out = {"header": header, "device": gpu, "results": [
        {"config": r.config.name, "images_per_s": r.images_per_s, "step_ms": r.step_ms, "warmup_s": r.warmup_s,
         "timed_steps": r.timed_steps, "peak_mem_gib": r.peak_mem_gib, "note": r.note} for r in results],
        "attention": attention, "loader": loader, "search": search, "seconds": time.perf_counter() - t_start}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
