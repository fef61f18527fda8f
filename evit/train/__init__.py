"""Conflict-aware supernet training (the paper's contribution) and its evidence.

- `samplers`   which subnets a step trains: uniform (sandwich), flat (control), complexity, elastic
- `banks`      the elastic sampler's memory banks; `load_banks` reads them back from a checkpoint
- `losses`     label-smoothed / soft / teacher CE, AlphaNet's adaptive alpha-divergence
- `step`       one step: forward + backward of every draw into one set of gradients
- `loop`       `Trainer` / `fit`: optimiser, schedule, EMA, DDP, checkpoints, evaluation
- `stage`      `train_supernet(params, resume)`: the `train` stage (files, MLflow, plots)
- `checkpoint` atomic save, safe load, `load_supernet`, RNG capture
- `import_reference` `evit import-reference`: the paper's released supernet -> an evit checkpoint
- `conflict`   gradient cosine between subnets of one step and of adjacent steps
- `ablate`     `run_ablation(params)`: uniform vs flat vs complexity vs elastic, several seeds
- `distributed` torchrun helpers; `logbook` step records, batched MLflow, plots
Evaluation (BN recalibration, top-1) is shared with search, export and the baselines:
`evit.evaluate`.
"""
