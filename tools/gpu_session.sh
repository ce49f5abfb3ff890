#!/usr/bin/env bash
# One batched session on the GPU host (see tools/gpu_pack.sh): unpacks the bundle, then runs the
# named steps in order, each bounded by a timeout, each writing $OUT/<step>.log and a line to
# $OUT/summary.txt. Every GPU figure in bench/results/ and in the issues' notes of 2026-11-29
# (second session) came from these steps.
#   tests       tools/gpu_tests.sh (gpu_smoke, cuda_ops, reference_cuda, nccl_collective)
#   server      server_test against one GPU worker (GEMMA2_SERVER_BACKEND=cuda)
#   sanitize    compute-sanitizer memcheck over cuda_ops_test
#   racecheck   compute-sanitizer racecheck over the fresh-prefill attention test
#   bench       gemma2-bench, 27B shapes, random weights, every row
#   clusterbench  the same through a coordinator and one NCCL worker process
#   side8       ours, Hugging Face eager and Hugging Face compiled at 27B widths, 8 layers
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gemma2-gpu-out}
mkdir -p "$OUT"
python3 -c "import tarfile; tarfile.open('.gpuz/gpu.tar.xz').extractall()"
source .gpu/env.sh
# The tests find programs under the build tree they were built in (/work/main/build here).
R=$PWD
if [ "$R" != /work/main ]; then rm -rf /work/main; mkdir -p /work; ln -sfn "$R" /work/main; fi
rm -rf build; ln -s .gpu build
export GEMMA2_TEST_BIN=$R/.gpu/bin/tests
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/env.txt" 2>&1
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  ( timeout -s KILL "$limit" "$@" ) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
}
bench=.gpu/bin/gemma2-bench
hf="env PYTHONUNBUFFERED=1 python3 tools/bench_hf.py"
for s in "$@"; do
  case $s in
    tests) step gpu_tests 300 env GEMMA2_TEST_TIMEOUT=200 tools/gpu_tests.sh ;;
    server) step server 200 env GEMMA2_SERVER_BACKEND=cuda GEMMA2_LEDGER_SECONDS=10 .gpu/bin/tests/server_test ;;
    sanitize) step sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/tests/cuda_ops_test ;;
    racecheck) step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/bin/tests/cuda_ops_test --gtest_filter='*FreshPrefill*' ;;
    bench) step bench 300 $bench --preset 27b --random-weights 1 --out "$OUT/bench.json" ;;
    clusterbench) step clusterbench 300 $bench --launch local --tp 1 --preset 27b --random-weights 1 --batches 1 16 64 --prompts 128 --prefills 2048 --out "$OUT/bench_cluster.json" ;;
    side8)
      step ours8 120 $bench --preset 27b --random-weights 1 --layers 8 --batches 1 16 --prompts 128 --prefills 2048 --out "$OUT/ours8.json"
      step hfeager8 200 $hf --preset 27b --layers 8 --batches 1,16 --prompt 128 --new-tokens 32 --repeat 2 --out "$OUT/hf_eager8.json"
      step hfcompiled8 240 $hf --preset 27b --layers 8 --batches 1,16 --prompt 128 --new-tokens 32 --repeat 2 --compile --out "$OUT/hf_compiled8.json" ;;
    *) echo "unknown step: $s" >&2; exit 2 ;;
  esac
done
