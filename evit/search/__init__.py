"""The search stage: the most accurate subnet under each of a device's budgets.

- `stage`: `search_device(params, device)`: inputs, one evolutionary search per budget,
  final evaluation and measurement, outputs; compares with the baselines' results;
- `evolution`, `budgets`, `seeding` (populations seeded from the memory banks), `fitness`
  (the per-arch cache of BN-calibrated top-1), `pareto` (front and plot).
"""
