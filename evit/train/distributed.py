"""Multi-process training under `torchrun` (one process per GPU, one or many nodes).

    torchrun --nproc-per-node 8 --nnodes 2 --node-rank R --master-addr HOST \
        "$(which evit)" train -p params.imagenet.yaml

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` then joins the group
(NCCL on GPUs, gloo on CPU) and picks the device. Without those variables everything
runs as one process and these helpers are no-ops.

Rules the training loop follows so that DDP stays correct:
- every rank builds the same sampler from `train.seed` and draws the same subnets (the
  sampler's RNG is never touched by rank-dependent code); bank scores are all-reduced
  before the sampler sees them;
- the data is sharded by `SeededSampler(rank, world_size)`;
- only rank 0 writes checkpoints, logs, plots and MLflow records;
- the end of training checks that all ranks hold the same weights and drew the same subnets.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available (the process's local GPU), else CPU."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from evit.config import ConfigError

        raise ConfigError("train.device = 'cuda' but no CUDA device is visible; accepted here: 'auto' or 'cpu'")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.info("joined process group: rank %d/%d (local %d), backend %s, device %s", rank, world, local,
                 backend, device)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean over ranks of a few floats (identity on one process)."""
    if not info.enabled or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def all_gather_floats(values: list[float], info: DistInfo) -> list[list[float]]:
    if not info.enabled:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    out = [torch.zeros_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_int(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return int(t.item())
