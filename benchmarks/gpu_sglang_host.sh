#!/usr/bin/env bash
# Run on the GPU host (no network), in the repo root, after every part of the
# SGLang bundle has been shipped with ../shared/offline-gpu (stage.sh + install.sh)
# and omegaconf's wheel sits in .whl/:
#   bash benchmarks/gpu_sglang_host.sh tests   # install, pytest, checks + small-model timing
#   bash benchmarks/gpu_sglang_host.sh big     # SmolLM2-135M-shape timing, and bench_hf if present
# Results go to $OUT (sglang.json, pytest.log, ...).
set -u
stage=${1:-tests}
OUT=${OUT:-/tmp/mezo-out}; mkdir -p "$OUT"
source benchmarks/gpu_host_env.sh
sglang_site=$(bash .offline/carry/install.sh | tail -1 | sed -n 's/^export PYTHONPATH=//p')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$stage" = tests ]; then
  export PYTHONPATH=$repo:$sglang_site:$extra
  python3 -c "import sglang, torch, transformers, peft, omegaconf; print('sglang', sglang.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1
  timeout 270 python3 -m pytest -q -rs -p no:cacheprovider tests/test_sglang_backend.py -k "gpu or plugin or eviction" 2>&1 | tee "$OUT/pytest.log" | grep -v -i "warn" | tail -40
  timeout 280 python3 -m benchmarks.gpu_sglang --out "$OUT/sglang.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E '^(==|\{)' "$OUT/bench.log" | cut -c1-700 | tail -30
else
  export PYTHONPATH=$repo:$sglang_site:$extra
  timeout 300 python3 -m benchmarks.gpu_sglang --big-only --out "$OUT/sglang-big.json" > "$OUT/bench-big.log" 2>&1
  echo "big rc=$?"; grep -E '^(==|\{)' "$OUT/bench-big.log" | cut -c1-1200 | tail -10
  if [ -f benchmarks/bench_hf.py ]; then
    # the host's own transformers (SGLang's bundle pins an older one)
    PYTHONPATH=$repo:$extra timeout 200 python3 -m benchmarks.bench_hf --device cuda --preset llama-1.1b \
      --out "$OUT/hf-1.1b.json" > "$OUT/bench_hf.log" 2>&1
    echo "bench_hf rc=$?"; tail -c 1500 "$OUT/bench_hf.log"
  fi
fi
