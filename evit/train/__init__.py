"""Conflict-aware supernet training (the paper's contribution) and its evidence.

- `samplers`   which subnets a step trains: uniform (sandwich), flat (control), complexity, elastic (+ banks)
- `losses`     label-smoothed / soft / teacher CE, AlphaNet's adaptive alpha-divergence
- `step`       one step: forward + backward of every draw into one set of gradients
- `loop`       `Trainer` / `fit`: optimiser, schedule, EMA, DDP, checkpoints, evaluation
- `stage`      `train_supernet(params, resume)`: the `train` stage (files, MLflow, plots)
- `checkpoint` atomic save, safe load, `load_supernet`, `load_banks`, RNG capture
- `evaluate`   `recalibrate_bn`, `evaluate_top1`, `evaluate_subnet` (shared with search)
- `conflict`   gradient cosine between subnets of one step and of adjacent steps
- `ablate`     `run_ablation(params)`: uniform vs flat vs complexity vs elastic, several seeds
- `distributed` torchrun helpers; `logbook` step records, batched MLflow, plots
"""
