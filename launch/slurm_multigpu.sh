#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one process per node, all GPUs of a node in that process.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_multigpu.sh configs/llama3.2-3b-instruct_8gpu.yaml [key=value ...]
#
# The first node hosts the jax.distributed coordinator; every process gets its id from SLURM_PROCID.
#SBATCH --job-name=cme_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=cme_jax-%j.log
set -euo pipefail

config=${1:?config file}
shift
coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="${coordinator}:${CME_JAX_PORT:-12355}"
export JAX_NUM_PROCESSES="$SLURM_NNODES"

srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID=$SLURM_PROCID
  exec .venv/bin/python -m cme_jax.train --config "$0" --distributed "$@"
' "$config" "$@"
