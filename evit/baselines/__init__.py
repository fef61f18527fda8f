"""Standalone baselines: what a user would train instead of searching a supernet.

- `models`   the timm models of `baselines.models`, validated up front, their MACs/params
- `train`    one standalone model trained with the supernet's recipe and epoch budget
- `stage`    `run_baselines(params)`: train every model, top-1 on search/val, latency on
             every device with the same device code as the search, outputs + MLflow
- `compare`  searched subnet per budget vs the best baseline under the same budget
"""
