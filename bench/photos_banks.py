"""Do the memory banks train the subnets a search would pick? (the photos ablation, follow-up)

    .venv/bin/python bench/photos_banks.py                 # runs/photos, after `make results`
    .venv/bin/python bench/photos_banks.py --workdir DIR --top 3

The ablation scores every sampler on the same fixed random draws per FLOPs level. The
`elastic` sampler's memory banks steer training towards the best subnets found so far, so
its supernet may be worse on random draws and better on those. This takes each elastic
seed's bank subnets (the `--top` best by bank score per level) and evaluates them, on
`val` with BN recalibrated as the ablation does, on every sampler's supernet of the same
seed. It prints the mean top-1 per sampler and seed next to the ablation's random-draw
mean. Reads the ablation's checkpoints only; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "photos")
    ap.add_argument("--top", type=int, default=3, help="bank subnets per level (best bank scores)")
    args = ap.parse_args()
    work = args.workdir.resolve()
    if not (work / "params.yaml").is_file():
        print(f"skipped: {work}/params.yaml not found (run `make results` first)")
        return 0

    import os

    import torch

    from evit import paths
    from evit.arch import Arch
    from evit.config import load_params
    from evit.data.loader import PreparedData
    from evit.evaluate import evaluate_subnet
    from evit.resolve import space_from_params
    from evit.train.ablate import EVAL_SEED, EVAL_SPLIT, run_params
    from evit.train.checkpoint import load_supernet

    torch.set_num_threads(1)
    os.chdir(work)
    params = load_params(work / "params.yaml")
    data = PreparedData(paths.prepared_dir(params))
    space = space_from_params(params.space, data.num_classes)
    samplers = list(params.ablate.samplers)
    rows: dict[str, list[float]] = {s: [] for s in samplers}
    for seed in params.ablate.seeds:
        nets = {}
        for s in samplers:
            p, out_dir = run_params(params, s, seed)
            final = out_dir / paths.checkpoint_path(p).name
            if not final.is_file():
                print(f"skipped: {final} missing (the ablation has not finished)")
                return 0
            nets[s] = load_supernet(final, space=space)
        banks = nets["elastic"][1]["banks"]
        archs = [Arch.from_dict(e["arch_json"]) for lv in sorted(banks, key=int)
                 for e in sorted(banks[lv], key=lambda e: -e["score"])[:args.top]]
        for s in samplers:
            net, _ = nets[s]
            acc = statistics.fmean(evaluate_subnet(net, a, data, EVAL_SPLIT, params.train.bn_calib_batches,
                                                   params.train.batch_size, EVAL_SEED) for a in archs)
            rows[s].append(acc)
            print(f"seed {seed} {s:<10} top-1 on elastic's {len(archs)} bank subnets: {100 * acc:.1f}%", flush=True)
    print(f"\nmean top-1 (%) on the elastic banks' best {args.top} subnets per level, over seeds "
          f"{list(params.ablate.seeds)}:")
    for s in samplers:
        v = rows[s]
        sd = statistics.pstdev(v) if len(v) > 1 else 0.0
        print(f"  {s:<10} {100 * statistics.fmean(v):.1f} ± {100 * sd:.1f}   per seed "
              + ", ".join(f"{100 * x:.1f}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
