#!/usr/bin/env bash
# One accelerator session: memory of the largest GRPO shape with and without remat, then the GPU benchmarks.
#   OUT=dir bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for remat in none full; do
    timeout 150 python benchmarks/memory.py --remat $remat 2>&1 | grep -v "^W1\|^WARNING" | tee -a "$OUT/memory.txt"
done
timeout 330 python benchmarks/gpu.py --skip correctness forward --grpo 16x4x128x128 16x4x128x256 \
    --out "$OUT/gpu.txt" 2>&1 | grep -v "^W1\|^WARNING" | tail -40
