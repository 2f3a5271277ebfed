# Sourced on the GPU host (Python 3.12, torch+cu, transformers, peft; no network):
# installs the repository's distributions and the wheels carried in .whl/ (omegaconf,
# antlr4, gguf) into /tmp/site with pip itself -- real dist-info, so the plugins'
# entry points are found as on any machine -- and reassembles the bundled GGUF if
# its parts were carried in .device/ (the file is larger than one call may ship).
site=/tmp/site
if [ ! -f $site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --target $site .whl/*.whl . || return 1
  touch $site/.done
fi
export PYTHONPATH=$site PYTHONUNBUFFERED=1 PATH=$site/bin:$PATH
mkdir -p /tmp/model
for part in .device/gguf.part*; do [ -f "$part" ] && cp -n "$part" /tmp/model/; done
if [ ! -f /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ -f /tmp/model/gguf.part01 ]; then
  cat /tmp/model/gguf.part00 /tmp/model/gguf.part01 > /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export MEZO_MODEL=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
