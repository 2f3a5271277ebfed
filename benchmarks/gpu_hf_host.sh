#!/usr/bin/env bash
# On the GPU host, in the repo root (omegaconf's wheel in .whl/):
#   bash benchmarks/gpu_hf_host.sh     -> $OUT/hf-1.1b.json, $OUT/reuse-1.1b.json
set -u
OUT=${OUT:-/tmp/mezo-out}; mkdir -p "$OUT"
source benchmarks/gpu_host_env.sh
export PYTHONPATH=$repo:$extra
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 200 python3 -m benchmarks.bench_hf --device cuda --preset llama-1.1b --out "$OUT/hf-1.1b.json" \
  > "$OUT/bench_hf.log" 2>&1; echo "bench_hf rc=$?"; grep -E '"(step_ms|base_forward_ms|loss_forward_ms|step_over.*)"' "$OUT/bench_hf.log"
timeout 330 python3 -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256 \
  --out "$OUT/reuse-1.1b.json" > "$OUT/bench_reuse.log" 2>&1; echo "bench_reuse rc=$?"
grep -v '^ \|^{\|^}\|Warn\|warn' "$OUT/bench_reuse.log" | tail -20
