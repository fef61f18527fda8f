"""docs/results.md from the outputs of a run: the ablation and searched-vs-baselines tables.

    python -m evit.results_page --workdir runs/photos [--out docs/results.md] [--note "..."]

Reads, under the work directory (a project root the stages ran in):
- the sampler ablation: `<ablate.out_dir>/ablation.json`, or several per-seed reports
  (`<ablate.out_dir>/ablate-seed*/ablation.json`, when the seeds ran as parallel processes),
  merged here seed by seed;
- the baselines (`baselines.results`) and each device's search result, whose `baselines`
  rows are the comparison (evit.baselines.compare); with `--seed-workdir`, the same
  comparison from runs with other seeds, as mean ± std over seeds.
Writes the page and copies its plots beside it (`docs/results/`), so the page renders from
the repository. Nothing is recomputed: the page says what the files say, with the epochs
and seeds they were produced with.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from evit.baselines.compare import comparison_markdown, comparison_rows
from evit.config import load_params
from evit.io import read_json, write_text_atomic

SAMPLER_ORDER = ("uniform", "flat", "complexity", "elastic", "elastic-compressed")
SAMPLER_NOTE = {
    "uniform": "sandwich: largest from labels, smallest + 2 random distilled from the largest",
    "flat": "control: complexity's losses (3 from labels, min distilled from their mean), draws over the whole space",
    "complexity": "level walk, 3 draws in the level from labels, a min subnet distilled from their mean",
    "elastic": "complexity + per-level memory banks, the reference code's rules (performance-aware)",
    "elastic-compressed": "complexity + evit's earlier short-run banks (exploit ramp compressed into the run, "
                          "30 entries, advantage scores)",
}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def merge_ablation(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed ablation reports (same samplers, epochs and subnets) as one report, seeds concatenated."""
    if len(reports) == 1:
        return reports[0]
    base = reports[0]
    for r in reports[1:]:
        if r["epochs"] != base["epochs"] or r["archs"] != base["archs"]:
            raise ValueError("ablation reports of different epochs or evaluated subnets cannot be merged")
    seeds = [s for r in reports for s in r["seeds"]]
    samplers: dict[str, Any] = {}
    for name in base["samplers"]:
        runs = [r["samplers"][name] for r in reports]
        levels = {}
        for lv, info in base["samplers"][name]["levels"].items():
            vals = [v for run in runs for v in run["levels"][lv]["per_seed"]]
            mean, std = _stats(vals)
            levels[lv] = {**info, "per_seed": vals, "top1_mean": mean, "top1_std": std}
        overall = [v for run in runs for v in run["top1_mean_per_seed"]]
        conflict: dict[str, Any] = {}
        for key, kinds in base["samplers"][name]["conflict"].items():
            conflict[key] = {}
            for kind in kinds:
                vals = [v for run in runs for v in run["conflict"][key][kind]["per_seed"]]
                conflict[key][kind] = {"mean": statistics.fmean(vals) if vals else None,
                                       "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "per_seed": vals}
        samplers[name] = {"levels": levels, "top1_mean": statistics.fmean(overall), "top1_mean_per_seed": overall,
                          "conflict": conflict}
        if all(run.get("picked") for run in runs):
            samplers[name]["picked"] = {
                "mean_per_seed": [v for run in runs for v in run["picked"]["mean_per_seed"]],
                "levels": {lv: {k: [v for run in runs for v in run["picked"]["levels"][lv][k]] for k in info}
                           for lv, info in runs[0]["picked"]["levels"].items()}}
        sources = set.intersection(*(set(run.get("bank_subnets", {})) for run in runs))
        samplers[name]["bank_subnets"] = {src: [v for run in runs for v in run["bank_subnets"][src]]
                                          for src in sorted(sources)}
    from evit.train.ablate import conflict_vs_accuracy

    return {**base, "seeds": seeds, "samplers": samplers, "conflict_vs_accuracy": conflict_vs_accuracy(samplers)}


def load_ablation(workdir: Path, out_dir: str) -> dict[str, Any] | None:
    root = workdir / out_dir
    parts = sorted(root.glob("ablate-seed*/ablation.json"))
    if parts:
        return merge_ablation([read_json(p) for p in parts])
    single = root / "ablation.json"
    return read_json(single) if single.is_file() else None


def _ordered(names: Any) -> list[str]:
    return sorted(names, key=lambda s: (SAMPLER_ORDER.index(s) if s in SAMPLER_ORDER else 99, s))


def ablation_markdown(rep: dict[str, Any]) -> str:
    names = _ordered(rep["samplers"])
    first = rep["samplers"][names[0]]["levels"]
    lines = ["| level | MFLOPs | " + " | ".join(f"{n} top-1 %" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for lv in sorted(first, key=int):
        cells = [f"{100 * rep['samplers'][n]['levels'][lv]['top1_mean']:.1f} ± "
                 f"{100 * rep['samplers'][n]['levels'][lv]['top1_std']:.1f}" for n in names]
        lines.append(f"| {lv} | {first[lv]['flops_m']:.1f} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        m, s = _stats(rep["samplers"][n]["top1_mean_per_seed"])
        cells.append(f"**{100 * m:.1f} ± {100 * s:.1f}**")
    lines.append("| all levels | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_seed(rep: dict[str, Any], sampler: str, metric: str) -> list[float] | None:
    r = rep["samplers"][sampler]
    if metric == "random":
        return r["top1_mean_per_seed"]
    return (r.get("picked") or {}).get("mean_per_seed")


def decomposition_markdown(rep: dict[str, Any], metric: str = "random") -> str:
    """Paired (same seed) differences of the all-level mean: what each ingredient adds.

    metric: "random" (the level's min + fixed draws) or "picked" (what search would pick).
    """
    s = rep["samplers"]
    steps = [("losses (sandwich -> 3 supervised + mean-distilled min)", "uniform", "flat"),
             ("level sampling (whole space -> FLOPs-level walk)", "flat", "complexity"),
             ("memory banks, reference rules (performance-aware)", "complexity", "elastic"),
             ("memory banks, evit's earlier compressed rules", "complexity", "elastic-compressed"),
             ("reference rules instead of compressed", "elastic-compressed", "elastic"),
             ("total", "uniform", "elastic")]
    lines = ["| ingredient | from -> to | gain (pts), mean ± std over seeds | per seed |", "|---|---|---|---|"]
    for label, a, b in steps:
        if a not in s or b not in s:
            continue
        xa, xb = _per_seed(rep, a, metric), _per_seed(rep, b, metric)
        if not xa or not xb:
            continue
        diffs = [100 * (y - x) for x, y in zip(xa, xb, strict=True)]
        m, sd = _stats(diffs)
        lines.append(f"| {label} | {a} -> {b} | {m:+.1f} ± {sd:.1f} | {', '.join(f'{d:+.1f}' for d in diffs)} |")
    return "\n".join(lines)


def picked_markdown(rep: dict[str, Any]) -> str:
    """Per level: val top-1 of the subnet each supernet's search-split ranking picks."""
    names = [n for n in _ordered(rep["samplers"]) if rep["samplers"][n].get("picked")]
    if not names:
        return ""
    first = rep["samplers"][names[0]]["picked"]["levels"]
    flops = {lv: rep["samplers"][names[0]]["levels"][lv]["flops_m"] for lv in first}
    lines = ["| level | MFLOPs | " + " | ".join(f"{n} top-1 %" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for lv in sorted(first, key=int):
        cells = []
        for n in names:
            m, sd = _stats(rep["samplers"][n]["picked"]["levels"][lv]["val_top1"])
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}")
        lines.append(f"| {lv} | {flops[lv]:.1f} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        m, sd = _stats(rep["samplers"][n]["picked"]["mean_per_seed"])
        cells.append(f"**{100 * m:.1f} ± {100 * sd:.1f}**")
    lines.append("| all levels | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bank_subnets_markdown(rep: dict[str, Any]) -> str:
    """Each banked sampler's best bank entries, top-1 on every sampler's supernet."""
    names = _ordered(rep["samplers"])
    sources = sorted({src for n in names for src in rep["samplers"][n].get("bank_subnets", {})})
    if not sources:
        return ""
    lines = ["| bank subnets of | " + " | ".join(f"on {n} %" for n in names) + " |", "|---|" + "---|" * len(names)]
    for src in sources:
        cells = []
        for n in names:
            v = rep["samplers"][n].get("bank_subnets", {}).get(src)
            if not v:
                cells.append("-")
                continue
            m, sd = _stats(v)
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conflict_accuracy_markdown(rep: dict[str, Any]) -> str:
    c = rep.get("conflict_vs_accuracy") or {}
    rows = []
    for suffix, runs in (("", "all"), ("/no_uniform", "all but uniform")):
        for key, label in (("as_trained", "own weights"), ("shared_weights", "shared weights")):
            for metric, mlabel in (("random", "random draws"), ("picked", "picked subnets")):
                v = c.get(f"{key}/{metric}{suffix}") or {}
                if v.get("spearman") is not None:
                    rows.append(f"| same-step cosine ({label}) | top-1 of {mlabel} | {runs} | {v['spearman']:+.2f} "
                                f"| {v['n']} |")
    if not rows:
        return ""
    return "\n".join(["| conflict measure | accuracy | runs | Spearman rho | n |", "|---|---|---|---|---|", *rows])


def conflict_markdown(rep: dict[str, Any]) -> str:
    names = _ordered(rep["samplers"])
    lines = ["| sampler | cos same step (own weights) | cos adjacent steps (own weights) | "
             "cos same step (shared weights) | cos adjacent steps (shared weights) |", "|---|---|---|---|---|"]
    for n in names:
        c = rep["samplers"][n]["conflict"]
        cells = []
        for key in ("as_trained", "shared_weights"):
            for kind in ("same_step", "adjacent_step"):
                v = c.get(key, {}).get(kind, {})
                cells.append("-" if v.get("mean") is None else f"{v['mean']:.3f} ± {v['std']:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baselines_markdown(doc: dict[str, Any]) -> str:
    devices = list(doc["devices"])
    lines = ["| model | MMACs | Mparams | val top-1 % | " + " | ".join(f"{d} ms" for d in devices) + " |",
             "|---|---|---|---|" + "---|" * len(devices)]
    for m in sorted(doc["models"], key=lambda m: m["macs_m"]):
        lines.append(f"| {m['model']} | {m['macs_m']:.2f} | {m['params_m']:.2f} | {100 * m['val_top1']:.1f} | "
                     + " | ".join(f"{m['latency_ms'].get(d, float('nan')):.3f}" for d in devices) + " |")
    return "\n".join(lines)


def seed_comparison(runs: dict[int, tuple[dict[str, Any], dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per device and budget, the searched subnet vs the best baseline under it, over seeds.

    `runs`: seed -> (baselines document, device -> search result) of one comparison run each
    (supernet and baselines trained with that seed). Rows are recomputed with the search's
    own `comparison_rows`, then grouped by (device, budget)."""
    grouped: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for seed, (doc, results) in sorted(runs.items()):
        for device, res in results.items():
            for r in comparison_rows(device, res["budgets"], doc):
                grouped.setdefault((device, r["budget"]), {})[seed] = r
    out = []
    for (device, budget), by_seed in grouped.items():
        seeds = sorted(by_seed)
        searched = [by_seed[s]["searched_val_top1"] for s in seeds]
        base = [by_seed[s]["baseline_val_top1"] for s in seeds if by_seed[s]["baseline_val_top1"] is not None]
        deltas = [by_seed[s]["delta_top1"] for s in seeds if by_seed[s]["delta_top1"] is not None]
        out.append({"device": device, "budget": budget, "seeds": seeds, "searched": searched, "baseline": base,
                    "baselines_named": [by_seed[s]["baseline"] or "none fits" for s in seeds], "deltas": deltas,
                    "over_budget": sum(not by_seed[s]["searched_within_budget"] for s in seeds)})
    return out


def seed_comparison_markdown(rows: list[dict[str, Any]]) -> str:
    def ms(v: list[float]) -> str:
        if not v:
            return "-"
        m, s = _stats(v)
        return f"{100 * m:.1f} ± {100 * s:.1f}"

    lines = ["| device | budget | seeds | searched top-1 % | best baseline within budget (per seed) | "
             "its top-1 % | delta (pts), mean ± std | delta per seed | searched over budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dm = "-" if not r["deltas"] else "{:+.1f} ± {:.1f}".format(*(100 * x for x in _stats(r["deltas"])))
        lines.append(f"| {r['device']} | {r['budget']} | {', '.join(map(str, r['seeds']))} | {ms(r['searched'])} | "
                     f"{', '.join(r['baselines_named'])} | {ms(r['baseline'])} | {dm} | "
                     f"{', '.join(f'{100 * d:+.1f}' for d in r['deltas']) or '-'} | {r['over_budget']} |")
    return "\n".join(lines)


def baselines_over_seeds_markdown(docs: dict[int, dict[str, Any]]) -> str:
    names = [m["model"] for m in sorted(next(iter(docs.values()))["models"], key=lambda m: m["macs_m"])]
    lines = ["| model | val top-1 %, mean ± std | per seed |", "|---|---|---|"]
    for n in names:
        v = [m["val_top1"] for _, d in sorted(docs.items()) for m in d["models"] if m["model"] == n]
        m, s = _stats(v)
        lines.append(f"| {n} | {100 * m:.1f} ± {100 * s:.1f} | {', '.join(f'{100 * x:.1f}' for x in v)} |")
    return "\n".join(lines)


def load_comparison(workdir: Path) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(seed, baselines document, device -> search result) of one run, None if incomplete."""
    params = load_params(workdir / "params.yaml")
    base_path = workdir / params.baselines.results
    if not base_path.is_file():
        return None
    results = {}
    for dp in params.devices:
        res_path = workdir / params.search.out_dir / f"search-{dp.name}" / "result.json"
        if res_path.is_file():
            results[dp.name] = read_json(res_path)
    return params.train.seed, read_json(base_path), results


def render(workdir: Path, out: Path, note: str = "", compare_workdir: Path | None = None,
           ablation_workdirs: tuple[Path, ...] = (), seed_workdirs: tuple[Path, ...] = ()) -> str:
    """The page; the comparison (section 2) comes from `compare_workdir` when given (a run with
    another epoch budget than the ablation's), else from `workdir`; the ablations of
    `ablation_workdirs` (other epoch budgets) follow the first one; `seed_workdirs` are the
    same comparison with other seeds (bench/photos.py --compare-seeds), summarised with the
    first as mean ± std over seeds."""
    params = load_params(workdir / "params.yaml")
    figs = out.parent / out.stem
    figs.mkdir(parents=True, exist_ok=True)
    parts = ["# Results on real photos", "",
             "Generated by `python -m evit.results_page` from the outputs in "
             f"`{workdir}` (params: `{workdir / 'params.yaml'}`, data: `{params.data.source}`). "
             "Regenerate with `make results` (runs `bench/photos.py`).", ""]
    if note:
        parts += [note, ""]
    for wd in (workdir, *ablation_workdirs):
        rep = load_ablation(wd, load_params(wd / "params.yaml").ablate.out_dir)
        if rep is None:
            continue
        png = f"ablation-{rep['epochs']}ep.png"
        parts += [f"## Sampler ablation: {rep['epochs']} epochs, seeds {rep['seeds']}", "",
                  f"Top-1 on `{rep['split']}` per FLOPs level (mean over the level's min subnet and "
                  f"{rep['subnets_per_level']} fixed seeded draws, the same subnets for every sampler, BN "
                  "recalibrated, no retraining), mean ± std over seeds.", "",
                  "\n".join(f"- `{n}`: {SAMPLER_NOTE.get(n, '')}" for n in _ordered(rep["samplers"])), "",
                  ablation_markdown(rep), "", "### Which part of the gain comes from what (random draws)", "",
                  decomposition_markdown(rep), ""]
        picked = picked_markdown(rep)
        if picked:
            parts += ["### What search would pick", "",
                      f"Per level, the same {rep.get('pick_candidates')} fixed seeded candidates for every sampler, "
                      "ranked on the `search` split (BN recalibrated); the table gives the `val` top-1 of each "
                      "supernet's best candidate, mean ± std over seeds.", "", picked, "",
                      "Paired gains on this metric:", "", decomposition_markdown(rep, "picked"), ""]
        banks = bank_subnets_markdown(rep)
        if banks:
            parts += ["### The banks' own best subnets", "",
                      f"The {rep.get('bank_top')} best entries per level of each banked sampler's final banks, "
                      "`val` top-1 on every sampler's supernet of the same seed, mean ± std over seeds.", "",
                      banks, ""]
        parts += ["### Gradient conflict (cosine of shared-weight gradients; "
                  f"{rep['conflict_steps']} steps per sampler and seed)", "", conflict_markdown(rep), ""]
        corr = conflict_accuracy_markdown(rep)
        if corr:
            parts += ["Does less conflict (a higher cosine) predict accuracy? Spearman over every (sampler, seed) "
                      "run:", "", corr, ""]
        from evit.train.ablate import (
            plot_ablation,  # the ablation's own plot, of the merged seeds
        )

        plot_ablation(rep, figs / png)
        parts += [f"![ablation {rep['epochs']} epochs]({figs.name}/{png})", ""]
    if compare_workdir is not None:
        workdir, params = compare_workdir, load_params(compare_workdir / "params.yaml")
    comparison = load_comparison(workdir)
    if comparison is not None:
        _, doc, results = comparison
        parts += [f"## Searched subnets vs standalone models ({doc['epochs']} epochs, {doc['resolution']} px)", "",
                  f"From `{workdir}`: supernet (`elastic`, seed {params.train.seed}) and baselines trained "
                  f"{params.train.epochs} epochs; search top-1 on the `search` split, final numbers on `val`.", "",
                  "Standalone timm models trained from scratch with the supernet's recipe and epoch budget, "
                  "timed with the same device code and estimator as the searched subnets.", "",
                  baselines_markdown(doc), ""]
        for dp in params.devices:
            if dp.name not in results:
                parts += [f"_{dp.name}: no search result_", ""]
                continue
            # recomputed: the same function as the search's
            rows = comparison_rows(dp.name, results[dp.name]["budgets"], doc)
            parts += [f"### {dp.name}", "", comparison_markdown(dp.name, rows), ""]
            png = workdir / "plots" / f"search-{dp.name}.png"
            if png.is_file():
                shutil.copy2(png, figs / png.name)
                parts += [f"![search {dp.name}]({figs.name}/{png.name})", ""]
    if seed_workdirs:
        runs = {}
        for wd in (workdir, *seed_workdirs):
            got = load_comparison(wd)
            if got is not None:
                runs[got[0]] = (got[1], got[2])
        if len(runs) > 1:
            parts += [f"### Over seeds {sorted(runs)}", "",
                      "The same comparison repeated with each seed: supernet from the ablation's `elastic` run of "
                      "that seed, baselines retrained with it, search with it (same LUTs). Each seed's baselines are "
                      "timed again, so which baseline fits a budget may change from seed to seed.", "",
                      seed_comparison_markdown(seed_comparison(runs)), "", "Baselines over seeds:", "",
                      baselines_over_seeds_markdown({k: v[0] for k, v in runs.items()}), ""]
    kept = spliced_blocks(out.read_text()) if out.is_file() else []
    text = "\n\n".join(["\n".join(parts).rstrip(), *kept]) + "\n"
    write_text_atomic(out, text)
    return text


_BLOCK = re.compile(r"<!-- ([\w-]+):start -->\n.*?\n<!-- \1:end -->", re.DOTALL)


def spliced_blocks(page: str) -> list[str]:
    """Sections other benchmarks spliced into the page (`<!-- name:start -->` ... `<!-- name:end -->`,
    e.g. bench/finetune.py's): a regenerated page keeps them, since this generator cannot remake them."""
    return [m.group(0) for m in _BLOCK.finditer(page)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Render docs/results.md from a run's outputs.")
    ap.add_argument("--workdir", type=Path, default=Path("runs/photos"))
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--note", default="", help="a paragraph placed under the title (how the run was made)")
    ap.add_argument("--ablation-workdir", type=Path, action="append", default=[],
                    help="another run's ablation (e.g. another epoch budget), shown after the first")
    ap.add_argument("--seed-workdir", type=Path, action="append", default=[],
                    help="the comparison repeated with another seed (bench/photos.py --compare-seeds)")
    ap.add_argument("--compare-workdir", type=Path, default=None,
                    help="take the searched-vs-baselines section from this run instead")
    args = ap.parse_args(argv)
    if not (args.workdir / "params.yaml").is_file():
        raise SystemExit(f"error: {args.workdir}/params.yaml not found; run `make results` (bench/photos.py) first")
    render(args.workdir, args.out, args.note, args.compare_workdir, tuple(args.ablation_workdir),
           tuple(args.seed_workdir))
    print(args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
