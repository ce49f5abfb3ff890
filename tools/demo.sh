#!/usr/bin/env bash
# `make demo`: a batch of prompts through Gemma 2 on the CPU backend, tensor parallel 2 in-process.
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
      whole path (tokenizer, sharded forward over 2 ranks, KV cache, sampling) working end to end.
      For real answers point it at a Hugging Face Gemma 2 checkpoint:
        make demo MODEL=/path/to/gemma-2-27b
      or run build/bin/gemma2-run --model /path/to/gemma-2-27b --prompt "..." directly.
MSG
fi
echo "demo: $(wc -l < tools/demo_prompts.txt) prompts from tools/demo_prompts.txt, model $model"
"$bin/gemma2-run" --model "$model" --tp 2 --prompts-file tools/demo_prompts.txt \
  --max-new-tokens 24 --format text
