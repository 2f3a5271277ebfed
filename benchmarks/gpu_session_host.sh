#!/usr/bin/env bash
# On the GPU host, in the repo root (omegaconf's wheel in .whl/):
#   bash benchmarks/gpu_session_host.sh a|hf|b|c|d|r|e  -> $OUT/*.json, logs  (parts: a device call is <= 10 min)
# The CUDA tests (Triton kernel, CUDA graphs), the full-parameter perturbation
# bench on the 6.7B shape, the hf step with and without CUDA graphs, the reuse rows.
set -u
OUT=${OUT:-/tmp/mezo-out}; mkdir -p "$OUT"
source benchmarks/gpu_host_env.sh
export PYTHONPATH=$repo:$extra
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
part=${1:-a}
if [ "$part" = a ]; then
timeout 200 python3 -m pytest -p no:cacheprovider -q -x tests/test_perturb.py tests/test_reuse.py \
  -k "cuda or triton or graph" > "$OUT/pytest-gpu.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest-gpu.log"
timeout 330 python3 -m benchmarks.bench_perturb --device cuda --shape llama-6.7b --sweep --out "$OUT/perturb-6.7b.json" \
  > "$OUT/bench_perturb.log" 2>&1; echo "bench_perturb rc=$?"; grep -v '^ \|^{\|^}' "$OUT/bench_perturb.log" | tail -30
elif [ "$part" = hf ]; then
for g in false true; do
  timeout 115 python3 -m benchmarks.bench_hf --device cuda --preset llama-1.1b --hf cuda_graphs=$g \
    --out "$OUT/hf-1.1b-graphs-$g.json" > "$OUT/bench_hf-$g.log" 2>&1; echo "bench_hf graphs=$g rc=$?"
  grep -E '"(step_ms|base_forward_ms|loss_forward_ms|step_over.*)"' "$OUT/bench_hf-$g.log"
done
elif [ "$part" = c ]; then
for opts in "lora_dtype=model" "lora_dtype=model cuda_graphs=true"; do
  tag=${opts// /-}; tag=${tag//=/-}
  timeout 115 python3 -m benchmarks.bench_hf --device cuda --preset llama-1.1b $(printf -- '--hf %s ' $opts) \
    --out "$OUT/hf-1.1b-$tag.json" > "$OUT/bench_hf-$tag.log" 2>&1; echo "bench_hf $opts rc=$?"
  grep -E '"(step_ms|base_forward_ms|step_over.*)"' "$OUT/bench_hf-$tag.log"
done
timeout 300 python3 -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256 --eps-steps 2 \
  --rows "trunk cache" "trunk cache + CUDA graphs" "trunk cache + model-dtype LoRA" \
         "trunk cache + CUDA graphs + model-dtype LoRA" \
  --out "$OUT/reuse-1.1b-lora-dtype.json" > "$OUT/bench_reuse-c.log" 2>&1; echo "bench_reuse rc=$?"
grep -v '^ \|^{\|^}\|Warn\|warn\|Loading' "$OUT/bench_reuse-c.log" | tail -12
elif [ "$part" = d ]; then  # host overhead and fusion: CUDA tests, profiles with the device's busy time
timeout 150 python3 -m pytest -p no:cacheprovider -q -x tests/test_perturb.py tests/test_reuse.py \
  -k "cuda or triton or graph or compile" > "$OUT/pytest-gpu.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest-gpu.log"
for opts in "cuda_graphs=true lora_dtype=model" "compile=true cuda_graphs=true lora_dtype=model trim_last_layer=true"; do
  tag=${opts// /-}; tag=${tag//=/-}
  timeout 200 python3 -m benchmarks.profile_step --device cuda --shape llama-1.1b --lora-layers top \
    $(printf -- '--hf %s ' $opts) > "$OUT/profile-trunk-$tag.txt" 2>&1; echo "profile $opts rc=$?"
  grep '^#' "$OUT/profile-trunk-$tag.txt"
done
elif [ "$part" = r ]; then  # the trunk rows, timed round robin, and their peak memory in fresh processes
timeout 400 python3 -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256 --eps-steps 2 \
  --memory --rows "trunk cache" "trunk cache + compile + CUDA graphs + model-dtype LoRA" "trunk cache + every GPU option" \
  --out "$OUT/reuse-1.1b.json" > "$OUT/bench_reuse.log" 2>&1; echo "bench_reuse rc=$?"
grep -v '^ \|^{\|^}\|Warn\|warn\|Loading\|Writing' "$OUT/bench_reuse.log" | tail -22
elif [ "$part" = e ]; then  # the all-layer step with the fused layers
for opts in "lora_dtype=model" "compile=true cuda_graphs=true lora_dtype=model trim_last_layer=true" "compile=true"; do
  tag=${opts// /-}; tag=${tag//=/-}
  timeout 170 python3 -m benchmarks.bench_hf --device cuda --preset llama-1.1b $(printf -- '--hf %s ' $opts) \
    --out "$OUT/hf-1.1b-$tag.json" > "$OUT/bench_hf-$tag.log" 2>&1; echo "bench_hf $opts rc=$?"
  grep -E '"(step_ms|base_forward_ms|step_over.*)"' "$OUT/bench_hf-$tag.log"
done
else
timeout 400 python3 -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256 --eps-steps 2 \
  --rows "trunk cache" "trunk cache + CUDA graphs" "trunk cache + shared prefixes" "plain (LoRA all layers)" \
  --out "$OUT/reuse-1.1b.json" > "$OUT/bench_reuse.log" 2>&1; echo "bench_reuse rc=$?"
grep -v '^ \|^{\|^}\|Warn\|warn' "$OUT/bench_reuse.log" | tail -16
timeout 150 python3 -m benchmarks.profile_step --device cuda --shape llama-1.1b --lora-layers all --trunk false \
  > "$OUT/profile-all-layers.txt" 2>&1; echo "profile rc=$?"; head -4 "$OUT/profile-all-layers.txt"
fi
