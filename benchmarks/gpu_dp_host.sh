#!/usr/bin/env bash
# On a 2-GPU host (kind nvidia-h200-x2), in the repo root, omegaconf's wheel in .whl/:
#   bash benchmarks/gpu_dp_host.sh   -> $OUT/dp1.json, $OUT/dp2.json (same global batch)
set -u
OUT=${OUT:-/tmp/mezo-out}; mkdir -p "$OUT"
source benchmarks/gpu_host_env.sh
export PYTHONPATH=$repo:$extra
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for n in 1 2; do
  timeout 140 python3 -m torch.distributed.run --nproc_per_node $n -m benchmarks.bench_dp \
    --shape llama-1.1b --global-batch 32 --seq 256 --out "$OUT/dp$n.json" > "$OUT/dp$n.log" 2>&1
  echo "world=$n rc=$?"; grep -E '"(step_ms|tokens_per_second|ranks_hold_identical_adapters)"' "$OUT/dp$n.log"
done
