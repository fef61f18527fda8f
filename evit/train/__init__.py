"""Conflict-aware supernet training (the paper's contribution) and its evidence.

- `samplers`   which subnets a step trains: the interface, uniform (sandwich), flat (control), complexity
- `elastic`    performance-aware sampling: `elastic` (the reference code's bank rules), `elastic-compressed`
- `sampler_factory` the sampler `train.sampler` names, from the `train` params
- `banks`      the elastic samplers' memory banks; `load_banks` reads them back from a checkpoint
- `losses`     label-smoothed / soft / teacher CE, AlphaNet's adaptive alpha-divergence
- `step`       one step: forward + backward of every draw into one set of gradients
- `loop`       `Trainer` / `fit`: optimiser, schedule, EMA, DDP, checkpoints, evaluation
- `stage`      `train_supernet(params, resume)`: the `train` stage (files, MLflow, plots)
- `checkpoint` atomic save, safe load, `load_supernet`, RNG capture
- `import_reference` `evit import-reference`: the paper's released supernet -> an evit checkpoint
- `conflict`   gradient cosine between subnets of one step and of adjacent steps
- `ablate`     `run_ablation(params)`: the samplers on random draws and on what search would pick, several seeds
- `distributed` torchrun helpers; `logbook` step records, batched MLflow, plots
Evaluation (BN recalibration, top-1) is shared with search, export and the baselines:
`evit.evaluate`.
"""
