#!/usr/bin/env bash
# Run cme_jax training on a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [VERSION]   # e.g. create cme-v5e us-west4-a v5litepod-8
#   launch/tpu_vm.sh setup   NAME ZONE                          # copy this checkout to every worker and install it
#   launch/tpu_vm.sh train   NAME ZONE CONFIG [key=value ...]  # start training on all workers, stream worker 0
#   launch/tpu_vm.sh logs    NAME ZONE                          # re-attach to worker 0's log
#   launch/tpu_vm.sh stop    NAME ZONE                          # stop the training processes on every worker
#   launch/tpu_vm.sh delete  NAME ZONE                          # delete the slice
#
# Every worker runs the same command; `jax.distributed.initialize()` inside the trainer discovers the
# slice topology from the TPU metadata server, so no addresses or process ids are passed by hand.
# Point run_dir at a filesystem every worker shares (NFS/Filestore, or a bucket mounted with gcsfuse) so all
# workers write one checkpoint; TensorBoard logs and metrics come from worker 0.
set -euo pipefail

cmd=${1:-help}
name=${2:-}
zone=${3:-}
remote_dir='~/cme_jax'
gc() { gcloud compute tpus tpu-vm "$@"; }
all() { gc ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$cmd" in
  create)
    accel=${4:?accelerator type, e.g. v5litepod-8 or v4-32}
    version=${5:-v2-alpha-tpuv5-lite}
    if gc describe "$name" --zone "$zone" >/dev/null 2>&1; then
      echo "reusing existing TPU VM $name in $zone"
    else
      gc create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
    fi
    ;;
  setup)
    tarball=$(mktemp --suffix=.tar.gz)
    git ls-files -z | tar --null -czf "$tarball" -T -
    gc scp "$tarball" "$name":/tmp/cme_jax.tar.gz --zone "$zone" --worker=all
    all "mkdir -p $remote_dir && tar -xzf /tmp/cme_jax.tar.gz -C $remote_dir && cd $remote_dir && \
         python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
    rm -f "$tarball"
    ;;
  train)
    config=${4:?config file, e.g. configs/qwen2.5-1.5b_tpu-v5e-8.yaml}
    shift 4
    overrides=$(printf ' %q' "$@")
    # nohup keeps training alive if the ssh session drops; each worker logs to its own file.
    all "cd $remote_dir && nohup .venv/bin/python -m cme_jax.train --config $config --distributed$overrides \
         > train-\$(hostname).log 2>&1 &"
    "$0" logs "$name" "$zone"
    ;;
  logs)
    gc ssh "$name" --zone "$zone" --worker=0 --command "cd $remote_dir && tail -n +1 -F train-\$(hostname).log"
    ;;
  stop)
    # SIGTERM makes the trainer save a checkpoint and exit cleanly (the same path as a preemption).
    all "pkill -TERM -f 'cme_jax.train' || true"
    ;;
  delete)
    gc delete "$name" --zone "$zone" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    ;;
esac
