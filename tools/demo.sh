#!/usr/bin/env bash
# `make demo`: the real local cluster — gemma2-launch with tensor parallel 2 on the CPU backend (a
# coordinator and 2 worker processes) serving OpenAI's API on loopback — and a file of batched
# prompts sent through it by gemma2-client.
# Usage: tools/demo.sh BUILD_DIR DEMO_MODEL_DIR MODEL_DIR
# With MODEL_DIR = DEMO_MODEL_DIR a tiny random-weight checkpoint is created there once.
set -euo pipefail
build=$1 demo_dir=$2 model=$3
bin=$build/bin
if [[ $model == "$demo_dir" ]]; then
  if [[ ! -f $demo_dir/config.json ]]; then
    echo "demo: creating a tiny random-weight Gemma 2 checkpoint in $demo_dir"
    "$bin/gemma2-make-checkpoint" --out "$demo_dir" --corpus tools/demo_corpus.txt --seed 2024 \
      --hidden 64 --layers 4 --heads 4 --kv-heads 2 --head-dim 16 --intermediate 128 --window 16 \
      2>"$build/demo-make-checkpoint.log"
  fi
  cat <<'MSG'
demo: NOTE — this model has RANDOM weights: the text below is meaningless by design. It shows the
      whole path (HTTP API, scheduler, control plane, 2 worker processes with a sharded forward and
      an all-reduce per layer, KV cache, sampling, tokenizer) working end to end.
      For real answers point it at a Hugging Face Gemma 2 checkpoint:
        make demo MODEL=/path/to/gemma-2-27b
MSG
fi
log=$build/demo-launch.log
"$bin/gemma2-launch" --model "$model" --backend cpu --tp 2 --port 0 >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 1200); do  # up to 120 s for the cluster to load and pass its first generation
  grep -q "ready" "$log" && break
  if ! kill -0 $pid 2>/dev/null; then
    echo "demo: gemma2-launch failed:"; cat "$log"; exit 1
  fi
  sleep 0.1
done
url=$(grep -o "http://[0-9.]*:[0-9]*" "$log" | head -1)
[[ -n $url ]] || { echo "demo: the cluster did not become ready in 120 s:"; cat "$log"; exit 1; }
echo "demo: $(head -1 "$log")"
echo "demo: $(wc -l < tools/demo_prompts.txt) prompts from tools/demo_prompts.txt through gemma2-client"
"$bin/gemma2-client" --url "$url" --input tools/demo_prompts.txt --max-tokens 24 --concurrency 8 \
  --format text
echo "demo: the same server answers any OpenAI client, e.g."
echo "  curl $url/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 8}'"
