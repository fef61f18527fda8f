"""The evidence on real photos (`make results`): ablation + pipeline + baselines -> docs/results.md.

    .venv/bin/python bench/photos.py                     # flowers32, params.photos.yaml as is
    .venv/bin/python bench/photos.py --epochs 2 --jobs 1 # fewer epochs, seeds one after another

Needs `../shared/data/flowers32` (or `--data DIR`, any ImageFolder); without it, prints why
and exits 0 (skipped), like a benchmark. Runs in a work directory (`runs/photos`, ignored
by git) so the default profile's outputs are untouched; each step is the `evit` CLI, so
everything resumes and finished runs are reused:
1. `evit prepare`;
2. the sampler ablation, one process per seed (`--jobs`), each with its own results folder
   and MLflow store (merged by the page generator), concurrently with
3. the pipeline chain: `evit train` (its run is the ablation's elastic seed-0 run: same
   train params, so it is handed over instead of trained twice), `evit baselines`, and
   `evit lut` + `evit search` per device;
4. with `--compare-seeds 1 2`: the searched-vs-baselines comparison again per seed (in
   `<workdir>-seed<N>`: that seed's elastic supernet from the ablation, baselines retrained
   with the seed, searches with the same LUTs), for the spread over seeds;
5. `python -m evit.results_page` -> docs/results.md + docs/results/*.png.
`--epochs` sets train.epochs and ablate.epochs (and so the baselines' budget) together.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _evit(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    fh = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "evit.cli", *args], cwd=cwd, env=env, stdout=fh, stderr=fh)


def _check(proc: subprocess.Popen[bytes], what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}); see its log in the work directory")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flowers32")
    ap.add_argument("--params", type=Path, default=REPO / "params.photos.yaml")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "photos")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs and ablate.epochs (default: the profile's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="ablation seeds (default: the profile's)")
    ap.add_argument("--jobs", type=int, default=3, help="ablation seeds run as this many parallel processes "
                    "(default 3: one per seed; the whole run took 40 min on 2 cores so)")
    ap.add_argument("--compare-seeds", type=int, nargs="*", default=[],
                    help="repeat the searched-vs-baselines comparison with these seeds (ablation seeds: each "
                    "uses the ablation's elastic supernet of that seed, retrains the baselines with it and "
                    "searches again with the same LUTs), for the seed spread; ~15 min per seed on 2 cores")
    ap.add_argument("--ablation-only", action="store_true",
                    help="prepare + the sampler ablation only (no pipeline chain, no page): for another epoch "
                    "budget, shown with `python -m evit.results_page --ablation-workdir DIR`")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        print(f"skipped: {args.data} not found (flowers32 lives beside the project, see its SOURCE.md; "
              "or pass --data DIR with train/<class>/ and val/<class>/)")
        return 0

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    p = yaml.safe_load(args.params.read_text())
    p["data"]["source"] = str(args.data.resolve())
    if args.epochs is not None:
        p["train"]["epochs"] = p["ablate"]["epochs"] = args.epochs
    if args.seeds is not None:
        p["ablate"]["seeds"] = args.seeds
    bad = [s for s in args.compare_seeds if s not in (args.seeds or p["ablate"]["seeds"]) or s == p["train"]["seed"]]
    if bad:
        raise SystemExit(f"error: --compare-seeds {bad}: each must be an ablation seed other than train.seed "
                         f"({p['train']['seed']}); the comparison reuses that seed's elastic supernet")
    if p["train"]["epochs"] != p["ablate"]["epochs"] or p["train"]["sampler"] not in p["ablate"]["samplers"]:
        print("note: train and ablation budgets differ; the pipeline's supernet is trained separately")
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    from evit.workspace import workspace_lock

    # This script is the work directory's one writer: it holds the workspace lock, and the
    # `evit` processes it starts in parallel inherit it (EVIT_WORKSPACE_LOCK) instead of
    # queueing behind each other.
    with workspace_lock(work, "bench/photos.py"):
        return _run(args, p, work)


def _run(args: argparse.Namespace, p: dict, work: Path) -> int:
    t0 = time.perf_counter()
    _check(_evit(["prepare", "--params", "params.yaml"], work, work / "prepare.log"), "evit prepare")

    seeds = list(p["ablate"]["seeds"])
    groups = [seeds[i::max(1, args.jobs)] for i in range(max(1, min(args.jobs, len(seeds))))]
    ablations = []
    for i, group in enumerate(groups):
        q = yaml.safe_load(yaml.safe_dump(p))
        q["ablate"]["seeds"] = group
        q["ablate"]["out_dir"] = f"{p['ablate']['out_dir']}/ablate-seed{'-'.join(map(str, group))}"
        q["tracking"]["uri"] = f"sqlite:///mlflow-ablate-{i}.db"  # one SQLite writer per process
        (work / f"params-ablate-{i}.yaml").write_text(yaml.safe_dump(q, sort_keys=False))
        ablations.append(_evit(["ablate", "--params", f"params-ablate-{i}.yaml"], work, work / f"ablate-{i}.log"))

    if args.ablation_only:
        for proc in ablations:
            _check(proc, "evit ablate")
        print(f"ablation done in {(time.perf_counter() - t0) / 60:.1f} min ({work})")
        return 0
    _check(_evit(["train", "--params", "params.yaml"], work, work / "train.log"), "evit train")
    handed = work / "models" / "ablate" / f"{p['train']['sampler']}-seed{p['train']['seed']}" / "supernet.pt"
    if p["train"]["epochs"] == p["ablate"]["epochs"] and not handed.exists():
        handed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "models" / "supernet.pt", handed)
    _check(_evit(["baselines", "--params", "params.yaml"], work, work / "baselines.log"), "evit baselines")
    for dev in p["devices"]:
        _check(_evit(["lut", "--device", dev["name"], "--params", "params.yaml"], work, work / "lut.log"), "evit lut")
        _check(_evit(["search", "--device", dev["name"], "--params", "params.yaml"], work, work / "search.log"),
               "evit search")
    chain_minutes = (time.perf_counter() - t0) / 60
    for proc in ablations:
        _check(proc, "evit ablate")
    seed_dirs = [_compare_seed(p, work, seed) for seed in args.compare_seeds]
    for seed, procs in seed_dirs:
        for proc in procs:
            _check(proc, f"comparison seed {seed}")
    minutes = (time.perf_counter() - t0) / 60
    load = os.getloadavg()
    note = (f"Run: `bench/photos.py` with train/ablate epochs {p['train']['epochs']}, ablation seeds {seeds} "
            f"({len(groups)} parallel process(es)); the pipeline chain (prepare, train, baselines, LUTs, searches) "
            f"took {chain_minutes:.0f} min beside the ablation, the whole run {minutes:.0f} min on {os.cpu_count()} cores, load average at "
            f"the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).")
    from evit.results_page import render

    render(work, args.out, note, seed_workdirs=tuple(work.parent / f"{work.name}-seed{seed}"
                                                      for seed, _ in seed_dirs))
    print(f"{args.out} written ({minutes:.1f} min)")
    return 0


def _compare_seed(p: dict, work: Path, seed: int) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """The comparison with another seed, in `<workdir>-seed<N>` (started; the caller waits):
    the ablation's elastic supernet of that seed, baselines trained with it, one search per
    device with the main run's LUTs and prepared data."""
    wd = work.parent / f"{work.name}-seed{seed}"
    (wd / "models").mkdir(parents=True, exist_ok=True)
    (wd / "luts").mkdir(exist_ok=True)
    q = yaml.safe_load(yaml.safe_dump(p))
    q["train"]["seed"] = q["search"]["seed"] = seed
    q["data"]["out_dir"] = str(work / p["data"]["out_dir"])
    (wd / "params.yaml").write_text(yaml.safe_dump(q, sort_keys=False))
    shutil.copy2(work / "models" / "ablate" / f"{p['train']['sampler']}-seed{seed}" / "supernet.pt",
                 wd / "models" / "supernet.pt")
    for lut in (work / "luts").glob("*.json"):
        if not lut.name.endswith(".partial.json"):
            shutil.copy2(lut, wd / "luts" / lut.name)
    cmds = [["baselines"]] + [["search", "--device", d["name"]] for d in p["devices"]]
    script = " && ".join(shlex.join([sys.executable, "-m", "evit.cli", *c, "--params", "params.yaml"]) for c in cmds)
    fh = open(wd / "compare.log", "ab")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return seed, [subprocess.Popen(["bash", "-c", script], cwd=wd, env=env, stdout=fh, stderr=fh)]


if __name__ == "__main__":
    sys.exit(main())
