#!/usr/bin/env bash
# Packs the programs and GPU tests for the GPU host (run from the repository root, after a build):
# stripped copies bundled with the libraries the host lacks (../shared/gpu/bundle.sh), compressed
# into .gpuz/gpu.tar.xz (about 11 MB; the bundle itself, with OpenBLAS, would not fit the 64 MiB
# that travels). Add /.gpu/ and /.gpuz/ to .git/info/exclude; carry .gpuz; then on the host:
#   bash tools/gpu_session.sh tests server bench ...
set -euo pipefail
rm -rf .gpu /tmp/gemma2-gpu-pack && mkdir -p /tmp/gemma2-gpu-pack/tests .gpuz
for f in gemma2-bench gemma2-client gemma2-serve-bench gemma2-launch gemma2-make-checkpoint gemma2-run gemma2-worker \
  gemma2-allreduce-bench; do
  cp build/bin/$f /tmp/gemma2-gpu-pack/
done
for t in gpu_smoke_test cuda_ops_test reference_cuda_test nccl_collective_test server_test cli_test; do
  cp build/bin/tests/$t /tmp/gemma2-gpu-pack/tests/
done
strip /tmp/gemma2-gpu-pack/* /tmp/gemma2-gpu-pack/tests/* 2>/dev/null || true
../shared/gpu/bundle.sh .gpu /tmp/gemma2-gpu-pack >/dev/null
# Gemma's vocabulary: random weights serve text and structured output with it (--tokenizer).
cp ../shared/tokenizers/gemma2-tokenizer.model .gpu/
tar -cJf .gpuz/gpu.tar.xz .gpu
ls -la .gpuz/gpu.tar.xz
