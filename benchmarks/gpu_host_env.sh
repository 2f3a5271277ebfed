# Sourced on the GPU host (no network, repo not installed): puts omegaconf from
# .whl/ and the repo's plugin packages on PYTHONPATH, with the dist-info that
# entry-point discovery needs. Sets $extra and $repo.
extra=/tmp/site-extra
if [ ! -f $extra/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $extra .whl/*.whl || exit 1
  for spec in mezo-builtin:builtin:mezo_builtin mezo-backend-hf:hf:mezo_backend_hf \
              mezo-backend-sglang:sglang:mezo_backend_sglang mezo-backend-vllm:vllm:mezo_backend_vllm; do
    IFS=: read -r dist ep mod <<< "$spec"
    d=$extra/${dist//-/_}-0.1.0.dist-info; mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "$dist" > "$d/METADATA"
    printf '[mezo]\n%s = %s\n' "$ep" "$mod" > "$d/entry_points.txt"
  done
  touch $extra/.done
fi
repo=$PWD:$PWD/backends/hf:$PWD/backends/sglang:$PWD/backends/vllm:$PWD/plugins/builtin
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
