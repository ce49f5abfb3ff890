#!/usr/bin/env bash
# One batched session on the GPU host (see tools/gpu_pack.sh): unpacks the bundle, then runs the
# named steps in order, each bounded by a timeout, each writing $OUT/<step>.log and a line to
# $OUT/summary.txt. Every GPU figure in bench/results/ and in the issues' notes since the second
# session of 2026-11-29 came from these steps.
#   tests       tools/gpu_tests.sh (gpu_smoke, cuda_ops, reference_cuda, nccl_collective)
#   server      server_test against one GPU worker (GEMMA2_SERVER_BACKEND=cuda)
#   sanitize    compute-sanitizer memcheck over cuda_ops_test
#   racecheck   compute-sanitizer racecheck over the fresh-prefill attention test
#   bench       gemma2-bench, 27B shapes, random weights, every row
#   clusterbench  the same through a coordinator and one NCCL worker process
#   side8       ours, Hugging Face eager and Hugging Face compiled at 27B widths, 8 layers
#   side        ours, Hugging Face eager and Hugging Face compiled, full 46 layers, one call, and
#               side_by_side.md (tools/side_by_side.py) with the ratios
#   large       the 27B shape cut to 2 layers (widths exact) against transformers: references made
#               there by tools/make_references.py (gigabytes, not committed), then reference_cuda_test
#   ncu16       Nsight Compute: per-kernel time of one batch-16 decode step (27B widths, 8 layers)
#   load        tools/load_speed.sh 9b: loading a 9B checkpoint from a cold page cache against dd
#   serve       issue 17: gemma2-serve-bench against gemma2-launch --backend cuda (27B shapes,
#               random weights): 256 requests of 512 prompt + 128 generated tokens at concurrency
#               64, a single stream, and 4 requests/s; the step trace summed by
#               tools/trace_summary.py (first steps of a shape against repeats)
#   servesweep  issue 17: that c64 workload at --max-step-tokens 256, 512, 1024, 2048, and with
#               --quantization fp8 at 512
#   servelocal  issue 17: the c64 and single-stream runs through gemma2-launch --in-process (no
#               workers) and through the cluster, in one call
#   structured  issue 15: the c64 workload unconstrained (twice: the first run warms the server),
#               in JSON mode (twice) and under a 10-property JSON Schema (every row masked on the
#               GPU), one launcher with Gemma's tokenizer: the cost of the masks
#   structuredwave  issue 15: one wave of 64 short prompts (decode steps of 64 rows), unmasked, under
#               the regex [a-z]+ (one mask shared by every row) and in JSON mode, twice each
#   fp8         issue 16: the FP8 kernels against the cpu specification, the FP8 engine against
#               transformers, then gemma2-bench 27B with --quantization fp8 and bf16, same shapes
#   fp8kv       issue 16: the FP8 KV cache (kernels against the cpu, memcheck, the engine against
#               transformers), then gemma2-bench 27B with --quantization fp8 --kv-cache-dtype fp8
#   fp8large    issue 16's numerics: tools/make_references.py's two FP8 shapes (27B widths, 3
#               layers, prompt 300; head_dim 256 with a 64-token window, 447 tokens; 48 decoded;
#               each with a transformers-format FP8 twin and the bf16 anchors), then
#               reference_cuda_test's Fp8CheckpointsWithinTheirTransformersAnchors on them
#   fp8skinny   issue 16: memcheck over the FP8 products (GEMV, skinny tensor-core kernel,
#               cuBLASLt), then gemma2-bench 27B FP8 at batches 16 and 64 with the skinny kernel
#               off (GEMMA2_FP8_SKINNY=0: cuBLASLt), the A/B for fp8kv's rows
# Issue 6, on a host with several GPUs (each uses every GPU the host shows):
#   mgcorrect   tools/multi_gpu_correctness.sh (TP 2/4/8 against TP 1, 4 layers, and a classifier)
#   allreduce   gemma2-allreduce-bench, eager and in CUDA graphs, 1..2048 tokens x 4608
#   mgscale     tools/multi_gpu_scaling.sh (gemma2-bench at TP 1, 2, 4, 8; table and SVG)
#   tp2peer     gemma2-bench at TP 2 with GEMMA2_PEER_ALLREDUCE=1 (the fused one-shot all-reduce)
#   mgpipeline  tools/multi_gpu_pipeline.sh (TP 4 x PP 2 against TP 4; needs 8 GPUs)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gemma2-gpu-out}
export OUT
mkdir -p "$OUT"
python3 -c "import tarfile; tarfile.open('.gpuz/gpu.tar.xz').extractall()"
source .gpu/env.sh
# The tests find programs under the build tree they were built in (/work/main/build here).
R=$PWD
if [ "$R" != /work/main ]; then rm -rf /work/main; mkdir -p /work; ln -sfn "$R" /work/main; fi
rm -rf build; ln -s .gpu build
export GEMMA2_TEST_BIN=$R/.gpu/bin/tests
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/env.txt" 2>&1
nvidia-smi topo -m >> "$OUT/env.txt" 2>&1
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  ( timeout -s KILL "$limit" "$@" ) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
}
bench=.gpu/bin/gemma2-bench
# Issue 17's serving runs: 512 prompt + 128 output tokens of random ids, greedy, ignore_eos.
export C64="--num-prompts 256 --input-len 512 --output-len 128 --concurrency 64 --warmup 16 --chunk-stats"
export C1="--num-prompts 8 --input-len 512 --output-len 128 --concurrency 1 --warmup 2"
export R4="--num-prompts 64 --input-len 512 --output-len 128 --request-rate 4 --warmup 4"
# serve_with PREFIX PORT "LAUNCH FLAGS" NAME "BENCH ARGS" [NAME "BENCH ARGS"]...: gemma2-launch
# (random 27B weights, cuda, tp 1) until ready, then each gemma2-serve-bench run into
# $OUT/PREFIX_NAME.json, then the launcher stopped.
serve_with() {
  local prefix=$1 port=$2 flags=$3 launcher
  shift 3
  # shellcheck disable=SC2086  # the flags are words
  .gpu/bin/gemma2-launch --model random:27b:1 --backend cuda --tp 1 --port "$port" $flags \
    > "$OUT/$prefix.launch.log" 2>&1 & launcher=$!
  for _ in $(seq 240); do grep -q ready "$OUT/$prefix.launch.log" && break; sleep 1; done
  while (($# >= 2)); do
    # shellcheck disable=SC2086
    .gpu/bin/gemma2-serve-bench --url "http://127.0.0.1:$port" --vocab-size 256000 $2 \
      --out "$OUT/${prefix}_$1.json"
    shift 2
  done
  kill "$launcher"; wait "$launcher"
}
export -f serve_with
# Issue 15's constrained runs (no whitespace: serve_with splits its arguments into words).
export JSON_MODE='{"response_format":{"type":"json_object"}}'
export LETTERS='{"structured_outputs":{"regex":"[a-z]+"}}'
# One wave of 64 short prompts: after 4 prefill steps every step decodes 64 rows.
export W64="--num-prompts 64 --input-len 16 --output-len 128 --concurrency 64 --warmup 64"
export SCHEMA10='{"response_format":{"type":"json_schema","json_schema":{"name":"r","schema":{"type":"object","properties":{"id":{"type":"integer","minimum":0,"maximum":100000},"name":{"type":"string","maxLength":40},"email":{"type":"string","maxLength":60},"age":{"type":"integer","minimum":0,"maximum":150},"active":{"type":"boolean"},"score":{"type":"number"},"tags":{"type":"array","items":{"type":"string","maxLength":16},"maxItems":5},"role":{"enum":["admin","user","guest"]},"address":{"type":"object","properties":{"city":{"type":"string","maxLength":30},"zip":{"type":"string","maxLength":10}},"required":["city"]},"note":{"type":["string","null"],"maxLength":80}},"required":["id","name","email","age","active","score","tags","role","address","note"]}}}}'

hf="env PYTHONUNBUFFERED=1 python3 tools/bench_hf.py"
for s in "$@"; do
  case $s in
    tests) step gpu_tests 300 env GEMMA2_TEST_TIMEOUT=200 tools/gpu_tests.sh ;;
    server) step server 200 env GEMMA2_SERVER_BACKEND=cuda GEMMA2_LEDGER_SECONDS=10 .gpu/bin/tests/server_test ;;
    sanitize) step sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/tests/cuda_ops_test ;;
    racecheck) step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/bin/tests/cuda_ops_test --gtest_filter='*FreshPrefill*' ;;
    bench) step bench 300 env GEMMA2_GEMM_LOG=1 $bench --preset 27b --random-weights 1 --out "$OUT/bench.json" ;;
    clusterbench) step clusterbench 300 $bench --launch local --tp 1 --preset 27b --random-weights 1 --batches 1 16 64 --prompts 128 --prefills 2048 --out "$OUT/bench_cluster.json" ;;
    side8)
      step ours8 120 $bench --preset 27b --random-weights 1 --layers 8 --batches 1 16 --prompts 128 --prefills 2048 --out "$OUT/ours8.json"
      step hfeager8 200 $hf --preset 27b --layers 8 --batches 1,16 --prompt 128 --new-tokens 32 --repeat 2 --out "$OUT/hf_eager8.json"
      step hfcompiled8 240 $hf --preset 27b --layers 8 --batches 1,16 --prompt 128 --new-tokens 32 --repeat 2 --compile --out "$OUT/hf_compiled8.json" ;;
    fp8)
      step fp8tests 240 env GEMMA2_GEMM_LOG=1 bash -c ".gpu/bin/tests/cuda_ops_test --gtest_filter='*Linear*' && \
        .gpu/bin/tests/reference_cuda_test"
      step fp8bench 420 env GEMMA2_GEMM_LOG=1 $bench --preset 27b --random-weights 1 --quantization fp8 \
        --batches 1,16,64 --prompts 128,2048 --prefills 512,2048 --out "$OUT/bench_fp8.json"
      step bf16bench 420 $bench --preset 27b --random-weights 1 --batches 1,16,64 --prompts 128,2048 \
        --prefills 512,2048 --out "$OUT/bench_bf16.json" ;;
    fp8kv)  # issue 16: the FP8 KV cache's kernels against the cpu, the engine against transformers,
      # then gemma2-bench with FP8 weights and the FP8 cache (decode at 2048, and the pool's size)
      step fp8kvtests 300 bash -c ".gpu/bin/tests/cuda_ops_test \
        --gtest_filter='*RopeCache*:*KvBlockCopies*:*FreshPrefill*:*Unmapped*' && \
        .gpu/bin/tests/reference_cuda_test --gtest_filter='*Fp8*'"
      step fp8kvmemcheck 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
        .gpu/bin/tests/cuda_ops_test --gtest_filter='*RopeCache*:*KvBlockCopies*'
      step fp8kvbench 420 $bench --preset 27b --random-weights 1 --quantization fp8 \
        --kv-cache-dtype fp8 --batches 1,16,64 --prompts 128,2048 --prefills 2048 \
        --out "$OUT/bench_fp8_kvfp8.json" ;;
    fp8large) step fp8large 590 bash -c "python3 tools/make_references.py --out /tmp/gemma2-fp8large \
      --only 27b_widths_3layers,hd256_window64 && GEMMA2_REFERENCE_DIRS=/tmp/gemma2-fp8large \
      .gpu/bin/tests/reference_cuda_test --gtest_filter='*Fp8CheckpointsWithin*'" ;;
    fp8skinny)
      step fp8skinnymemcheck 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
        .gpu/bin/tests/cuda_ops_test --gtest_filter='*LinearFp8*'
      step fp8skinnyoff 300 env GEMMA2_FP8_SKINNY=0 $bench --preset 27b --random-weights 1 \
        --quantization fp8 --kv-cache-dtype fp8 --batches 16,64 --prompts 128,2048 \
        --prefills 2048 --out "$OUT/bench_fp8_kvfp8_skinnyoff.json" ;;
    serve)
      step serve 420 bash -c 'serve_with serve 18500 "--trace $OUT/serve_trace.json" \
        c64 "$C64" c1 "$C1" r4 "$R4"'
      python3 tools/trace_summary.py "$OUT/serve_trace.json" --flop-per-token 54.4e9 \
        > "$OUT/serve_trace_summary.txt" 2>&1 ;;
    structured)  # issue 15: masks on the GPU against none, same launcher, same workload
      step structured 590 bash -c 'serve_with structured 18503 "--tokenizer .gpu/gemma2-tokenizer.model" \
        plain "$C64" plain2 "$C64" json "$C64 --extra-body $JSON_MODE" \
        json2 "$C64 --extra-body $JSON_MODE" schema "$C64 --extra-body $SCHEMA10"' ;;
    structuredwave)  # issue 15: decode steps of 64 rows, masked (one shared mask; JSON mode) or not
      step structuredwave 400 bash -c 'serve_with wave 18504 "--tokenizer .gpu/gemma2-tokenizer.model" \
        plain "$W64" letters "$W64 --extra-body $LETTERS" json "$W64 --extra-body $JSON_MODE" \
        plain2 "$W64" letters2 "$W64 --extra-body $LETTERS" json2 "$W64 --extra-body $JSON_MODE"' ;;
    servesweep)  # issue 17: the c64 workload over --max-step-tokens (and FP8 at 512)
      step servesweep 590 bash -c '
        for t in 256 512 1024 2048; do serve_with sweep_mst$t 18501 "--max-step-tokens $t" c64 "$C64"; done
        serve_with sweep_fp8_mst512 18501 "--max-step-tokens 512 --quantization fp8" c64 "$C64"' ;;
    servelocal)  # issue 17: the cluster hop's cost: the same runs through --in-process
      step servelocal 590 bash -c '
        serve_with hop_inprocess 18502 --in-process c64 "$C64" c1 "$C1"
        serve_with hop_cluster 18502 "" c64 "$C64" c1 "$C1"' ;;
    load) step load 400 env PATH="$R/.gpu/bin:$PATH" tools/load_speed.sh 9b "$OUT/load_speed" ;;
    side)
      step ours 240 $bench --preset 27b --random-weights 1 --prompts 128,512,2048 --out "$OUT/ours.json"
      step hfeager 200 $hf --preset 27b --shapes 1x128,16x128,64x512,1x2048 --new-tokens 16 --repeat 3 \
        --out "$OUT/hf_eager.json"
      step hfcompiled 420 $hf --preset 27b --shapes 1x128,16x128 --new-tokens 16 --repeat 3 --compile \
        --out "$OUT/hf_compiled.json"
      python3 tools/side_by_side.py "$OUT/ours.json" "$OUT/hf_eager.json" "$OUT/hf_compiled.json" \
        > "$OUT/side_by_side.md" 2>&1; cat "$OUT/side_by_side.md" ;;
    large) step large 300 bash -c "python3 tools/make_references.py --out /tmp/gemma2-large \
      --only 27b_shape_2layers && GEMMA2_REFERENCE_DIRS=/tmp/gemma2-large .gpu/bin/tests/reference_cuda_test" ;;
    mgcorrect) step mgcorrect 300 tools/multi_gpu_correctness.sh 4 "$OUT/multi_gpu_correctness" ;;
    allreduce) step allreduce 150 .gpu/bin/gemma2-allreduce-bench --gpus "$(nvidia-smi -L | wc -l)" \
      --out "$OUT/allreduce.json" ;;
    mgscale) step mgscale 590 tools/multi_gpu_scaling.sh "$OUT/multi_gpu_scaling" ;;
    tp2peer)  # TP 2 with the fused one-shot all-reduce on (GEMMA2_PEER_ALLREDUCE=1), for the A/B
      step tp2peer 200 env GEMMA2_PEER_ALLREDUCE=1 $bench --preset 27b --random-weights 1 \
        --launch local --tp 2 --batches 1,16,64 --prompts 128 --prefills 2048 --out "$OUT/tp2_peer.json" ;;
    mgpipeline) step mgpipeline 590 tools/multi_gpu_pipeline.sh "$OUT/multi_gpu_pipeline" ;;
    ncu16)  # per-kernel device time of 27B-width decode at batch 16 (8 layers) under Nsight Compute:
      # the first 1700 launches are the 16 prompts' prefills and the eager first step; then decode
      step ncu16 300 ncu --clock-control none --metrics gpu__time_duration.sum --launch-skip 1700 \
        --launch-count 400 \
        --csv --log-file "$OUT/ncu16.csv" $bench --preset 27b --random-weights 1 --layers 8 \
        --batches 16 --prompts 128 --prefills 128 ;;
    *) echo "unknown step: $s" >&2; exit 2 ;;
  esac
done
# Everything in one archive (only a few files of at most 16 MiB travel back), the summary beside
# it; the full-vocabulary logits of the correctness runs (tens of MB each) stay behind.
grep -hE "FAILED|Failure|PASS|FAIL|^\| |skipped" "$OUT"/*.log 2>/dev/null | head -150
tar -C "$OUT" -czf /tmp/gemma2-results.tgz --exclude='lm_tp*.json' . &&
  find "$OUT" -mindepth 1 -not -name summary.txt -delete &&
  mv /tmp/gemma2-results.tgz "$OUT/results.tgz"
