"""Scratch vs fine-tuned on flowers32: what starting from a trained supernet buys (docs/results.md).

    .venv/bin/python bench/fashion_mnist.py fm/usr/share/datasets/fashion-mnist /tmp/fashion-mnist
    .venv/bin/python bench/finetune.py --pretrain-data /tmp/fashion-mnist

The pretrained supernet must come from a larger dataset that is *different* from the target
and available offline: Fashion-MNIST from Debian's `dataset-fashion-mnist` (see
bench/fashion_mnist.py), 10 classes of grayscale clothes against flowers32's 5 classes of
colour flowers. Steps, each the `evit` CLI in its own folder under `--workdir` (ignored by
git), each skipped when its marker says it finished:
1. `pretrain/`: `evit prepare` + `evit train` on the pretraining data (photos profile,
   `--pretrain-epochs`);
2. `flowers/`: `evit prepare` of the target + `evit lut` for `--device` (one table, copied to
   every run: the same device, the same candidates' costs);
3. per seed, at equal epochs (`--epochs`), `evit train` + `evit search` (one budget) in
   `<variant>-seed<N>/`:
   - `scratch`: the photos profile as is;
   - `init`: the same recipe, `train.init` = the pretrained supernet (new 5-class head);
   - `init-recipe`: params.finetune.yaml's knobs on top (10x lower peak learning rate,
     stem frozen for the first 2 epochs);
4. every supernet is evaluated on the same subnets as the sampler ablation (per FLOPs level
   its min subnet + 3 fixed draws, BN recalibrated, top-1 on `val`); with the searched
   subnet's `val` top-1 this makes the table, written to `<workdir>/finetune.json` and
   spliced into `--out` between `<!-- finetune:start -->` and `<!-- finetune:end -->`.
`--jobs` processes run at once (default 2, one per core; each trains on 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("scratch", "init", "init-recipe")
RECIPE = {"lr": 0.0002, "freeze_stem_epochs": 2}  # params.finetune.yaml's, beside the photos recipe
START, END = "<!-- finetune:start -->", "<!-- finetune:end -->"


@dataclass
class Job:
    """A folder's chain of `evit` commands; each finished command leaves a marker, so a re-run
    (another `--search-*` setting, a killed bench) repeats only what is missing."""

    name: str
    folder: Path
    commands: dict[str, list[str]]
    """marker name -> `evit` arguments; the marker name carries the settings it depends on."""
    after: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def marker(self, step: str) -> Path:
        return self.folder / f"done-{step}"

    @property
    def done(self) -> bool:
        return all(self.marker(step).is_file() for step in self.commands)

    def start(self) -> None:
        steps = [f"{shlex.join([sys.executable, '-m', 'evit.cli', *args, '--params', 'params.yaml'])}"
                 f" && touch {shlex.quote(self.marker(step).name)}"
                 for step, args in self.commands.items() if not self.marker(step).is_file()]
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        fh = open(self.folder / "run.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(["bash", "-c", " && ".join(steps)], cwd=self.folder, env=env, stdout=fh,
                                     stderr=fh)


def _params(base: dict, folder: Path, **sections: dict) -> None:
    q = yaml.safe_load(yaml.safe_dump(base))
    for section, values in sections.items():
        q[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(q, sort_keys=False))


def plan(args: argparse.Namespace, work: Path) -> list[Job]:
    base = yaml.safe_load((REPO / "params.photos.yaml").read_text())
    dev = next(d for d in base["devices"] if d["name"] == args.device)
    base["devices"] = [{**dev, "budgets_ms": [args.budget_ms]}]
    base["baselines"]["models"] = []
    base["train"]["epochs"] = args.epochs
    jobs = []
    pre, flowers = work / "pretrain", work / "flowers"
    _params(base, pre, data={"source": str(args.pretrain_data.resolve()), "out_dir": "data/prepared"},
            train={"epochs": args.pretrain_epochs, "seed": 0})
    jobs.append(Job("pretrain", pre, {"prepare": ["prepare"], "train": ["train"]}))
    _params(base, flowers, data={"source": str(args.data.resolve()), "out_dir": "data/prepared"})
    jobs.append(Job("flowers", flowers, {"prepare": ["prepare"], "lut": ["lut", "--device", args.device]}))
    init = str(pre / "models" / "supernet.pt")
    search = {"population": args.search_population, "generations": args.search_generations}
    for seed in args.seeds:
        for variant in VARIANTS:
            folder = work / f"{variant}-seed{seed}"
            train: dict = {"seed": seed}
            if variant != "scratch":
                train["init"] = init
            if variant == "init-recipe":
                train.update(RECIPE)
            _params(base, folder, data={"source": str(args.data.resolve()), "out_dir": str(flowers / "data/prepared")},
                    train=train, search=search | {"seed": seed})
            after = ["flowers"] if variant == "scratch" else ["flowers", "pretrain"]
            steps = {"train": ["train"], f"search-p{args.search_population}-g{args.search_generations}":
                     ["search", "--device", args.device]}
            jobs.append(Job(f"{variant}-seed{seed}", folder, steps, after))
    return jobs


def run_jobs(jobs: list[Job], n: int, flowers: Path) -> int:
    """Runs what is not done yet, `n` at a time, in dependency order; returns how many ran."""
    by_name = {j.name: j for j in jobs}
    pending = [j for j in jobs if not j.done]
    started = len(pending)
    running: list[Job] = []
    while pending or running:
        for j in list(running):
            if j.proc is not None and j.proc.poll() is not None:
                running.remove(j)
                if j.proc.returncode != 0:
                    raise SystemExit(f"error: {j.name} failed (exit {j.proc.returncode}); see {j.folder}/run.log")
                print(f"{time.strftime('%H:%M:%S')} {j.name} done", flush=True)
        for j in list(pending):
            if len(running) >= n:
                break
            if all(by_name[a].done for a in j.after):
                if j.name != "flowers" and j.name != "pretrain":  # every run times the same table
                    (j.folder / "luts").mkdir(exist_ok=True)
                    for lut in (flowers / "luts").glob("*.json"):
                        if not lut.name.endswith(".partial.json"):
                            shutil.copy2(lut, j.folder / "luts" / lut.name)
                pending.remove(j)
                j.start()
                running.append(j)
                print(f"{time.strftime('%H:%M:%S')} {j.name} started", flush=True)
        time.sleep(2)
    return started


def evaluate(args: argparse.Namespace, work: Path) -> dict:
    """Per run: mean val top-1 over levels (the ablation's subnets) + the searched subnet's val top-1."""
    from evit import stages
    from evit.data.loader import PreparedData
    from evit.resolve import space_from_params
    from evit.train import checkpoint as ckpt_mod
    from evit.train.ablate import ablation_archs, top1

    params = stages.load(work / "flowers" / "params.yaml")
    data = PreparedData(work / "flowers" / "data" / "prepared")
    space = space_from_params(params.space, data.num_classes)
    archs = ablation_archs(space, 3)
    rows: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for variant in VARIANTS:
        for seed in args.seeds:
            folder = work / f"{variant}-seed{seed}"
            cached = folder / f"eval-p{args.search_population}-g{args.search_generations}.json"
            if cached.is_file():
                rows[variant][seed] = json.loads(cached.read_text())
                continue
            supernet, meta = ckpt_mod.load_supernet(folder / "models" / "supernet.pt", space=space)
            levels = {lv: statistics.fmean(top1(supernet, a, data, params) for a in named.values())
                      for lv, named in archs.items()}
            result = json.loads((folder / "results" / f"search-{args.device}" / "result.json").read_text())
            chosen = next(b for b in result["budgets"] if b.get("feasible"))
            metrics = json.loads((folder / "metrics" / "train.json").read_text())
            row = {"levels": levels, "top1_mean": statistics.fmean(levels.values()),
                   "searched": {"budget": chosen["label"], "val_top1": chosen["val_top1"], "key": chosen["key"],
                                "measured_latency_ms": chosen["measured_latency_ms"], "flops_m": chosen["flops_m"]},
                   "train_seconds": metrics.get("train_seconds"), "weights": meta.get("weights")}
            cached.write_text(json.dumps(row, indent=1))
            rows[variant][seed] = row
    pre = json.loads((work / "pretrain" / "metrics" / "train.json").read_text())
    return {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "seeds": args.seeds,
            "search_population": args.search_population, "search_generations": args.search_generations,
            "device": args.device, "budget_ms": args.budget_ms, "pretrain_top1_mean": pre.get("top1_mean"),
            "pretrain_seconds": pre.get("train_seconds"), "pretrain_data": str(args.pretrain_data), "runs": rows}


def _ms(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def table(report: dict) -> str:
    seeds = report["seeds"]
    runs = report["runs"]
    names = {"scratch": "from scratch", "init": "fine-tuned (`train.init`, same recipe)",
             "init-recipe": "fine-tuned + fine-tuning recipe (lr/10, stem frozen 2 epochs)"}
    lines = [(f"| start | mean top-1 over levels | searched subnet ({report['device']}, "
              f"{report['budget_ms']:g} ms) | gain vs scratch (levels / searched) | train time |"),
             "|---|---|---|---|---|"]
    for v in VARIANTS:
        lv = [runs[v][s]["top1_mean"] for s in seeds]
        sr = [runs[v][s]["searched"]["val_top1"] for s in seeds]
        secs = statistics.fmean(runs[v][s]["train_seconds"] or 0 for s in seeds)
        if v == "scratch":
            gain = ""
        else:
            gain = (_ms([runs[v][s]["top1_mean"] - runs["scratch"][s]["top1_mean"] for s in seeds]) + " / " +
                    _ms([runs[v][s]["searched"]["val_top1"] - runs["scratch"][s]["searched"]["val_top1"]
                         for s in seeds]))
        lines.append(f"| {names[v]} | {_ms(lv)} | {_ms(sr)} | {gain} | {secs:.0f} s |")
    return "\n".join(lines)


def section(report: dict) -> str:
    """The page's section: what was run, the table, and the paired gains' signs per seed."""
    seeds, runs = report["seeds"], report["runs"]
    signs = []
    for v in VARIANTS[1:]:
        for metric, get in (("levels", lambda r: r["top1_mean"]), ("searched", lambda r: r["searched"]["val_top1"])):
            gains = [get(runs[v][s]) - get(runs["scratch"][s]) for s in seeds]
            signs.append(f"`{v}` {metric}: {sum(g > 0 for g in gains)} of {len(gains)} seeds above scratch")
    pre = report.get("pretrain_top1_mean")
    return "\n".join([
        f"## Starting from a trained supernet: scratch vs fine-tuned ({report['epochs']} epochs, seeds {seeds})", "",
        f"Made by `bench/finetune.py` (work folder `runs/finetune`, {report['minutes']} min on 2 cores). The "
        f"pretrained supernet: the photos profile trained {report['pretrain_epochs']} epochs on Fashion-MNIST "
        "(Debian's `dataset-fashion-mnist`, 1,500 train images per class of 10 grayscale clothing classes; "
        "`bench/fashion_mnist.py`), a larger dataset unlike flowers32"
        + (f" (its own search top-1, mean over the level min subnets: {100 * pre:.1f}%)" if pre else "") + ". "
        f"Each variant then trains {report['epochs']} epochs on flowers32 with the same seeds; `init` variants get a "
        "new 5-class head. Columns: `val` top-1 mean ± std over seeds; per FLOPs level the ablation's subnets "
        "(min + 3 fixed draws, BN recalibrated), averaged over levels; the subnet `evit search` picks for "
        f"{report['device']} under {report['budget_ms']:g} ms (population {report['search_population']}, "
        f"{report['search_generations']} generations; one LUT shared by every run); "
        "gains paired by seed, in points; train time is wall time on a machine shared with other jobs (noise).",
        "",
        table(report), "", "; ".join(signs) + ".", ""])


def splice(out: Path, text: str) -> None:
    page = out.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in page and END in page:
        page = page[:page.index(START)] + block + page[page.index(END) + len(END):]
    else:
        page = page.rstrip("\n") + "\n\n" + block + "\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-data", type=Path, required=True, help="ImageFolder to pretrain on (bench/fashion_mnist.py)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flowers32")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "finetune")
    ap.add_argument("--epochs", type=int, default=6, help="epochs on the target, every variant")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu-1t")
    ap.add_argument("--budget-ms", type=float, default=4.0)
    ap.add_argument("--search-population", type=int, default=16,
                    help="the search's first generation (photos profile: 32; every run gets the same)")
    ap.add_argument("--search-generations", type=int, default=2, help="(photos profile: 4)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="page to splice the table into (e.g. docs/results.md)")
    args = ap.parse_args()
    for d in (args.data, args.pretrain_data):
        if not (d / "train").is_dir():
            print(f"skipped: {d} has no train/ folder")
            return 0
    work = args.workdir.resolve()
    t0 = time.perf_counter()
    jobs = plan(args, work)
    ran = run_jobs(jobs, args.jobs, work / "flowers")
    report = evaluate(args, work)
    report["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    previous = work / "finetune.json"
    if not ran and previous.is_file():  # only re-evaluated: the runs' time is the earlier one's
        report["minutes"] = json.loads(previous.read_text()).get("minutes", report["minutes"])
    (work / "finetune.json").write_text(json.dumps(report, indent=1))
    text = section(report)
    print(text)
    if args.out is not None:
        splice(args.out, text)
        print(f"{args.out}: table spliced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
