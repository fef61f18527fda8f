"""`evit ablate`: does conflict-aware sampling help? Same budget, the samplers, several seeds.

The samplers differ in two things: which subnets a step trains and with which losses.
`flat` (see `evit.train.samplers`) has `complexity`'s losses with draws over the whole
space, so uniform -> flat is the effect of the losses and flat -> complexity -> elastic
the effect of the sampling.

For every seed in `ablate.seeds` and sampler in `ablate.samplers`, a supernet is trained
with the `train` recipe for `ablate.epochs` epochs (checkpoints under
`<train.out_dir>/ablate/<sampler>-seed<seed>/`; a killed ablation resumes, a finished run
with the same params is reused). Every supernet is then evaluated on the SAME subnets, BN recalibrated, no retraining:
- random draws: per FLOPs level its min subnet plus `ablate.subnets_per_level` fixed
  seeded draws, top-1 on `val`;
- what search would pick: per level, `ablate.pick_candidates` fixed seeded draws (the same
  candidates for every sampler) ranked on the `search` split; the best one's top-1 on
  `val` is reported. This is the claim of performance-aware sampling: the banks steer
  training towards the subnets a search then picks, maybe at the cost of the rest;
- the banks' best: the `ablate.bank_top` best entries per level of each banked sampler's
  final banks, top-1 on `val` on every sampler's supernet of the same seed.

Gradient conflict (see `evit.train.conflict`): for each sampler, the cosine similarity of
shared-weight gradients of subnets drawn in the same step and in adjacent steps, measured
for `ablate.conflict_steps` steps (a) on the sampler's own trained supernet ("as_trained") and
(b) on one common supernet per seed, the `uniform` one when it is in the list
("shared_weights"), which isolates the effect of *which* subnets a sampler pairs.

Whether lower conflict predicts accuracy: the Spearman correlation, over every (sampler,
seed) run, between the same-step cosine and each accuracy metric.

Outputs: results/ablation.json (sampler -> level -> top-1 mean, std, per-seed values, the
picked subnets, the bank subnets, conflict numbers and their correlation with accuracy)
and results/ablation.png (top-1 vs FLOPs per sampler).
"""

from __future__ import annotations

import logging
import random
import statistics
from pathlib import Path
from typing import Any

import torch

from evit import flops, paths
from evit.arch import Arch
from evit.config import Params
from evit.evaluate import evaluate_subnet, isolated_rng, split_tensors
from evit.io import save_figure_atomic, write_json_atomic
from evit.resolve import space_from_params
from evit.space import SearchSpace
from evit.tracking import stage_run
from evit.train import checkpoint as ckpt_mod
from evit.train.conflict import measure_conflict
from evit.train.sampler_factory import make_sampler
from evit.train.samplers import BANKED

log = logging.getLogger(__name__)

EVAL_SPLIT = "val"
PICK_SPLIT = "search"
EVAL_SEED = 0


def ablation_archs(space: SearchSpace, per_level: int, seed: int = 0) -> dict[int, dict[str, Arch]]:
    """level -> {name: arch}: the level's min subnet and `per_level` fixed seeded draws."""
    from evit.level_sampler import LevelSampler

    ls = LevelSampler(space)
    out: dict[int, dict[str, Arch]] = {}
    for lv in range(len(space.levels)):
        rng = random.Random(f"evit-ablate-archs:{seed}:{lv}")
        archs = {"min": ls.min_arch(lv)}
        for i in range(per_level):
            archs[f"draw{i}"] = ls.sample(lv, rng)
        out[lv] = archs
    return out


def pick_candidates(space: SearchSpace, n: int) -> dict[int, list[Arch]]:
    """level -> `n` fixed seeded draws, the candidates of "what search would pick" (all samplers)."""
    from evit.level_sampler import LevelSampler

    ls = LevelSampler(space)
    out: dict[int, list[Arch]] = {}
    for lv in range(len(space.levels)):
        rng = random.Random(f"evit-ablate-pick:{lv}")
        out[lv] = list(dict.fromkeys(ls.sample(lv, rng) for _ in range(n)))
    return out


def bank_best(banks: dict[str, list[dict[str, Any]]], top: int) -> dict[int, list[Arch]]:
    """level -> the `top` best entries of a final checkpoint's banks (`banks_to_json` rows)."""
    return {int(lv): [Arch.from_dict(r["arch_json"]) for r in sorted(rows, key=lambda r: -r["score"])[:top]]
            for lv, rows in banks.items() if rows}


def run_params(params: Params, sampler: str, seed: int) -> tuple[Params, Path]:
    out_dir = paths.train_dir(params) / "ablate" / f"{sampler}-seed{seed}"
    train = params.train.model_copy(update={"sampler": sampler, "seed": seed, "epochs": params.ablate.epochs,
                                            "out_dir": str(out_dir)})
    return params.model_copy(update={"train": train}), out_dir


def _finished(final: Path, expect_hash: str) -> bool:
    if not final.is_file():
        return False
    try:
        ck = ckpt_mod.load_checkpoint(final)
    except ckpt_mod.CheckpointError:
        return False
    return ck.get("params_hash") == expect_hash and ck.get("kind") == "final"


def conflict_batches(data: Any, space: SearchSpace, batch_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed train batches (seeded, no augmentation) at the largest resolution."""
    x, y = split_tensors(data, "train", max(space.resolutions))
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(x), generator=g)
    n = min(batch_size, len(x) // max(1, steps)) or 1
    return [(x[idx[i * n:(i + 1) * n]], y[idx[i * n:(i + 1) * n]]) for i in range(steps)]


def top1(supernet: Any, arch: Arch, data: Any, params: Params, split: str = EVAL_SPLIT) -> float:
    """Top-1 of `arch` on `split`, BN recalibrated with the train recipe's batches, as every ablation number."""
    t = params.train
    return evaluate_subnet(supernet, arch, data, split, t.bn_calib_batches, t.batch_size, EVAL_SEED)


def pick_best(supernet: Any, candidates: list[Arch], data: Any, params: Params) -> dict[str, Any]:
    """The candidate with the best `search` top-1 (first on ties), and its `val` top-1."""
    scores = [top1(supernet, c, data, params, PICK_SPLIT) for c in candidates]
    best = scores.index(max(scores))
    return {"arch": candidates[best].key, "search_top1": scores[best],
            "val_top1": top1(supernet, candidates[best], data, params)}


def _steps_per_epoch(meta: dict[str, Any]) -> int:
    """Steps per epoch of a finished run (the exploit schedule of a re-created sampler needs it)."""
    epochs = int((meta.get("train") or {}).get("epochs") or 1)
    return max(1, int(meta.get("step") or 0) // epochs)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def plot_ablation(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for sampler, res in report["samplers"].items():
        lv = sorted(res["levels"], key=int)
        xs = [res["levels"][k]["flops_m"] for k in lv]
        ys = [100 * res["levels"][k]["top1_mean"] for k in lv]
        es = [100 * res["levels"][k]["top1_std"] for k in lv]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=sampler)
    ax.set_xlabel("MFLOPs (mean of the level's evaluated subnets)")
    ax.set_ylabel(f"top-1 on {report['split']} (%), mean ± std over seeds")
    ax.set_title(f"sampler ablation: {report['epochs']} epochs, seeds {report['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


def run_ablation(params: Params) -> dict[str, Any]:
    """Stage entry point (`evit ablate`); returns a compact table of the results."""
    from evit.data.loader import PreparedData
    from evit.train.loop import Trainer

    a = params.ablate
    data = PreparedData(paths.prepared_dir(params))
    space = space_from_params(params.space, data.num_classes)
    archs = ablation_archs(space, a.subnets_per_level)
    candidates = pick_candidates(space, a.pick_candidates) if a.pick_candidates else {}
    arch_flops = {lv: {n: flops.flops_m(ar, space) for n, ar in d.items()} for lv, d in archs.items()}
    per_run: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in a.samplers}
    shared_sampler = "uniform" if "uniform" in a.samplers else a.samplers[0]

    with stage_run(params, "ablate", log_sections=("ablate", "train", "space")) as parent:
        for seed in a.seeds:
            supernets: dict[str, Any] = {}
            states: dict[str, dict[str, Any]] = {}
            bank_archs: dict[str, dict[int, list[Arch]]] = {}
            for sampler in a.samplers:
                p, out_dir = run_params(params, sampler, seed)
                final = out_dir / paths.checkpoint_path(p).name
                info: dict[str, Any] = {}
                if _finished(final, ckpt_mod.params_hash(p, data.content_hash)):
                    log.info("ablation %s seed %d: reusing %s", sampler, seed, final)
                else:
                    with parent.child(f"ablate-{sampler}-seed{seed}",
                                      tags={"evit.stage": "ablate-run", "evit.sampler": sampler}) as child:
                        res = Trainer(p, out_dir=out_dir, resume=True, data=data, mlflow_run_id=child.run_id).fit()
                        info = {k: res.summary.get(k) for k in ("train_seconds", "images_per_s", "top1_mean")}
                supernet, meta = ckpt_mod.load_supernet(final, space=space)
                supernets[sampler], states[sampler] = supernet, meta["sampler"]
                if sampler in BANKED:
                    bank_archs[sampler] = bank_best(meta.get("banks") or {}, a.bank_top)

                levels: dict[int, Any] = {}
                for lv, named in archs.items():
                    accs = {n: top1(supernet, ar, data, params) for n, ar in named.items()}
                    levels[lv] = {"mean": statistics.fmean(accs.values()), "subnets": accs}
                picks = {lv: pick_best(supernet, cands, data, params) for lv, cands in candidates.items()}
                per_run[sampler][seed] = {"levels": levels, "picks": picks, "train": info,
                                          "weights": meta.get("weights"), "steps": meta.get("step"),
                                          "steps_per_epoch": _steps_per_epoch(meta)}
                log.info("ablation %s seed %d: val top-1 per level %s; of the picked subnets %s", sampler, seed,
                         {lv: round(v["mean"], 4) for lv, v in levels.items()},
                         {lv: round(v["val_top1"], 4) for lv, v in picks.items()})
            for source, by_level in bank_archs.items():
                for sampler in a.samplers:
                    accs = {lv: [top1(supernets[sampler], ar, data, params) for ar in ars]
                            for lv, ars in by_level.items()}
                    per_run[sampler][seed].setdefault("bank_subnets", {})[source] = {
                        "mean": statistics.fmean(v for vs in accs.values() for v in vs), "levels": accs}
                log.info("ablation seed %d: %s banks' best %d per level, val top-1 per supernet %s", seed, source,
                         a.bank_top, {s_: round(per_run[s_][seed]["bank_subnets"][source]["mean"], 4)
                                      for s_ in a.samplers})
            batches = conflict_batches(data, space, params.train.batch_size, a.conflict_steps)
            for sampler in a.samplers:
                for key, weights_of in (("as_trained", sampler), ("shared_weights", shared_sampler)):
                    start = int(per_run[sampler][seed]["steps"] or 0)
                    smp = make_sampler(sampler, space, seed, train=params.train,
                                       steps_per_epoch=per_run[sampler][seed]["steps_per_epoch"],
                                       total_steps=max(1, start) + a.conflict_steps)
                    smp.load_state_dict(states[sampler])
                    with isolated_rng():
                        c = measure_conflict(supernets[weights_of], smp, batches, start_step=start)
                    per_run[sampler][seed].setdefault("conflict", {})[key] = c
                    log.info("conflict %s (%s, seed %d): same-step %.4f, adjacent-step %.4f", sampler, key, seed,
                             c["same_step"]["mean"] or float("nan"), c["adjacent_step"]["mean"] or float("nan"))

        report = _report(params, per_run, archs, arch_flops)
        out = paths.ablation_dir(params)
        write_json_atomic(out / "ablation.json", report)
        plot_ablation(report, out / "ablation.png")
        metrics = {}
        for s, r in report["samplers"].items():
            metrics[f"{s}_top1_mean"] = r["top1_mean"]
            if r.get("picked"):
                metrics[f"{s}_picked_top1_mean"] = statistics.fmean(r["picked"]["mean_per_seed"])
            for key in ("as_trained", "shared_weights"):
                for kind in ("same_step", "adjacent_step"):
                    v = r["conflict"][key][kind]["mean"]
                    if v is not None:
                        metrics[f"{s}_cos_{key}_{kind}"] = v
        parent.log_metrics(metrics)
        parent.log_artifact(out / "ablation.json")
        parent.log_artifact(out / "ablation.png")
    return {"ablation": str(out / "ablation.json"), "plot": str(out / "ablation.png"),
            "top1": {s: {lv: round(v["top1_mean"], 4) for lv, v in r["levels"].items()}
                     for s, r in report["samplers"].items()},
            "conflict": {s: {k: {kind: r["conflict"][k][kind]["mean"] for kind in ("same_step", "adjacent_step")}
                             for k in ("as_trained", "shared_weights")} for s, r in report["samplers"].items()}}


def _report(params: Params, per_run: dict[str, dict[int, dict[str, Any]]], archs: dict[int, dict[str, Arch]],
            arch_flops: dict[int, dict[str, float]]) -> dict[str, Any]:
    a = params.ablate
    samplers: dict[str, Any] = {}
    for s, runs in per_run.items():
        seeds = sorted(runs)
        levels: dict[str, Any] = {}
        for lv in archs:
            vals = [runs[sd]["levels"][lv]["mean"] for sd in seeds]
            st = _stats(vals)
            levels[str(lv)] = {"top1_mean": st["mean"], "top1_std": st["std"], "per_seed": vals,
                               "flops_m": statistics.fmean(arch_flops[lv].values()),
                               "per_subnet": {n: [runs[sd]["levels"][lv]["subnets"][n] for sd in seeds]
                                              for n in archs[lv]}}
        conflict: dict[str, Any] = {}
        for key in ("as_trained", "shared_weights"):
            conflict[key] = {}
            for kind in ("same_step", "adjacent_step"):
                vals = [runs[sd]["conflict"][key][kind]["mean"] for sd in seeds
                        if runs[sd]["conflict"][key][kind]["mean"] is not None]
                conflict[key][kind] = _stats(vals)
        overall = [statistics.fmean(runs[sd]["levels"][lv]["mean"] for lv in archs) for sd in seeds]
        samplers[s] = {"levels": levels, "top1_mean": statistics.fmean(overall), "top1_mean_per_seed": overall,
                       "conflict": conflict, "train": {str(sd): runs[sd]["train"] for sd in seeds},
                       "weights": {str(sd): runs[sd]["weights"] for sd in seeds}}
        if all(runs[sd].get("picks") for sd in seeds):
            samplers[s]["picked"] = {
                "mean_per_seed": [statistics.fmean(v["val_top1"] for v in runs[sd]["picks"].values()) for sd in seeds],
                "levels": {str(lv): {"val_top1": [runs[sd]["picks"][lv]["val_top1"] for sd in seeds],
                                     "search_top1": [runs[sd]["picks"][lv]["search_top1"] for sd in seeds],
                                     "arch": [runs[sd]["picks"][lv]["arch"] for sd in seeds]}
                           for lv in runs[seeds[0]]["picks"]}}
        sources = set.intersection(*(set(runs[sd].get("bank_subnets", {})) for sd in seeds)) if seeds else set()
        samplers[s]["bank_subnets"] = {src: [runs[sd]["bank_subnets"][src]["mean"] for sd in seeds]
                                       for src in sorted(sources)}
    return {
        "split": EVAL_SPLIT,
        "epochs": a.epochs,
        "seeds": list(a.seeds),
        "subnets_per_level": a.subnets_per_level,
        "conflict_steps": a.conflict_steps,
        "pick_candidates": a.pick_candidates,
        "bank_top": a.bank_top,
        "archs": {str(lv): {n: {"arch": ar.key, "flops_m": round(arch_flops[lv][n], 4)} for n, ar in d.items()}
                  for lv, d in archs.items()},
        "samplers": samplers,
        "conflict_vs_accuracy": conflict_vs_accuracy(samplers),
    }


def conflict_vs_accuracy(samplers: dict[str, Any]) -> dict[str, Any]:
    """Does lower conflict predict accuracy? Spearman over every (sampler, seed) run.

    Same-step cosine (own weights, and shared weights) against the random-draw top-1 and
    the picked subnets' top-1 of the same run. Higher cosine = less conflict, so the
    paper's claim predicts a positive correlation. Computed over all runs, and without
    `uniform`, whose losses differ from the others' (so its runs alone can make the
    correlation).
    """
    from scipy.stats import spearmanr

    out: dict[str, Any] = {}
    for runs, suffix in ((samplers, ""), ({k: v for k, v in samplers.items() if k != "uniform"}, "/no_uniform")):
        for key in ("as_trained", "shared_weights"):
            for metric in ("random", "picked"):
                xs: list[float] = []
                ys: list[float] = []
                for r in runs.values():
                    cos = r["conflict"][key]["same_step"]["per_seed"]
                    acc = r["top1_mean_per_seed"] if metric == "random" \
                        else (r.get("picked") or {}).get("mean_per_seed")
                    if acc and len(acc) == len(cos):
                        xs += cos
                        ys += acc
                ok = len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1
                out[f"{key}/{metric}{suffix}"] = {"spearman": float(spearmanr(xs, ys).statistic) if ok else None,
                                                  "n": len(xs)}
    return out
