#!/usr/bin/env bash
# Train the supernet with torchrun: one process per GPU, on one or several machines (DDP;
# see evit/train/distributed.py: every rank draws the same subnets, data is sharded, rank 0
# writes the checkpoint, logs and MLflow records).
#
#   infra/torchrun.sh                                     # this machine, all its GPUs
#   infra/torchrun.sh -p params.imagenet.yaml --fresh     # arguments go to `evit train`
#   # two machines, 8 GPUs each: run on both, node 0's address as master
#   EVIT_NNODES=2 EVIT_NODE_RANK=0 EVIT_MASTER_ADDR=10.0.0.1 infra/torchrun.sh -p params.imagenet.yaml
#   EVIT_NNODES=2 EVIT_NODE_RANK=1 EVIT_MASTER_ADDR=10.0.0.1 infra/torchrun.sh -p params.imagenet.yaml
#
# Settings: EVIT_NPROC_PER_NODE (default: the GPUs nvidia-smi lists, else 1), EVIT_NNODES (1),
# EVIT_NODE_RANK (0), EVIT_MASTER_ADDR (127.0.0.1), EVIT_MASTER_PORT (29500).
# EVIT_DRY_RUN=1 prints the command instead of running it.
#
# Afterwards, on node 0 (which holds models/): `dvc commit train && dvc push` shares the
# checkpoint through the S3 remote; other machines `dvc pull train`. Inside the Prefect flow,
# `export EVIT_TORCHRUN_ARGS="--nproc-per-node 8"` makes the train task launch torchrun itself
# (single machine); the flow then records the stage in dvc.lock as usual.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpus=1
if command -v nvidia-smi > /dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "$gpus" -ge 1 ]] || gpus=1
fi
NPROC="${EVIT_NPROC_PER_NODE:-$gpus}"
NNODES="${EVIT_NNODES:-1}"
NODE_RANK="${EVIT_NODE_RANK:-0}"
MASTER_ADDR="${EVIT_MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${EVIT_MASTER_PORT:-29500}"
PY="${EVIT_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3 )}"

cmd=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m evit.cli train "$@")
if [[ "${EVIT_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${cmd[@]}"
