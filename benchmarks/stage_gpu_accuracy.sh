#!/usr/bin/env bash
# Stage an accuracy run on the GPU host (SST-2 with the bundled SmolLM2-135M GGUF) in the two
# device calls it takes: one call ships at most 64 MiB, the GGUF is 94 MiB.
#
#   bash benchmarks/stage_gpu_accuracy.sh [ASSETS]            # default ../shared/assets
#
# writes (git-ignored): .device1/ = GGUF part 0 + this commit's tree; .device/ = GGUF parts 1-2,
# its sha256, the SST-2 files (train without the 1000 validation rows of benchmarks.dev_like_val,
# val, dev) + the tree again; .whl/ must hold omegaconf, antlr4 and gguf wheels (benchmarks/gpu.py).
# Then, back to back (the host keeps /tmp only while warm):
#   call 1, carry [.device1, .whl]:
#     mkdir -p /tmp/gguf /tmp/head && cp .device1/gguf.part0 /tmp/gguf/ && tar -xzf .device1/head.tar.gz -C /tmp/head
#       && cp -r .whl /tmp/head/ && cd /tmp/head && python3 -c "from benchmarks.gpu import install; install()"
#   call 2, carry [.device]:
#     D=$PWD/.device; cp $D/gguf.part1 $D/gguf.part2 /tmp/gguf/ && mkdir -p /tmp/model
#       && cat /tmp/gguf/gguf.part0 /tmp/gguf/gguf.part1 /tmp/gguf/gguf.part2 > /tmp/model/m.gguf
#       && echo "$(cat $D/gguf.sha256)  /tmp/model/m.gguf" | sha256sum -c && cd /tmp/head && export PYTHONPATH=/tmp/site
#       && python3 -m benchmarks.estimators --suite gpu --out $OUT/estimators-gpu.json --deadline-s 480 --
#          model.path=/tmp/model/m.gguf task.train=$D/sst2dl/train.tsv task.val=$D/sst2dl/val.tsv
#          task.n_val=1000 task.dev=$D/sst2dl/dev.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
assets=${1:-../shared/assets}
gguf=$assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
for d in /.device/ /.device1/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
rm -rf .device .device1 && mkdir -p .device/sst2dl .device1
split -b 49000000 -d -a 1 "$gguf" .device/gguf.part
mv .device/gguf.part0 .device1/
sha256sum "$gguf" | cut -c1-64 > .device/gguf.sha256
.venv/bin/python -m benchmarks.dev_like_val "$assets/data/sst2/train.tsv" .device/sst2dl
cp "$assets/data/sst2/dev.tsv" .device/sst2dl/
git archive --format=tar.gz -o .device1/head.tar.gz HEAD
cp .device1/head.tar.gz .device/
du -sh .device .device1
