#!/usr/bin/env bash
# Issue 6, run 4 on a host with 8 GPUs: tensor parallel 4 x pipeline 2 (one 8-GPU host standing in
# for two nodes of 4) against tensor parallel 4 alone, 27B shapes with random weights through real
# worker processes (NCCL inside each stage and between the stages). Decode at batch 1, 16, 64 and
# 256 (steps of 256 tokens and more go through the stages in micro-batches), prefill 2048; a table
# of both and their ratio.
#
#   source .gpu/env.sh && tools/multi_gpu_pipeline.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-/tmp}/multi_gpu_pipeline}
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
((gpus >= 8)) || { echo "needs 8 GPUs, this host has $gpus"; exit 2; }
for pp in 1 2; do
  timeout 900 gemma2-bench --preset 27b --random-weights 1 --backend cuda --launch local --tp 4 \
    --pp "$pp" --batches 1,16,64,256 --prompts 128 --prefills 2048 --out "$out/tp4pp$pp.json" |
    tee "$out/tp4pp$pp.txt"
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
a, b = (json.load(open(os.path.join(out, f"tp4pp{p}.json"))) for p in (1, 2))
key = lambda r: (r["kind"], r.get("batch"), r.get("prompt", r.get("tokens")))
ms = lambda r: r.get("ms_per_step", r.get("ms"))
rows = {key(r): r for r in a["results"]}
lines = ["| kind | batch | tokens | TP4 ms | TP4 x PP2 ms | PP2 / PP1 |", "|---|---|---|---|---|---|"]
for r in b["results"]:
    k = key(r)
    if k in rows:
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {ms(rows[k]):.2f} | {ms(r):.2f} | {ms(r) / ms(rows[k]):.2f} |")
open(os.path.join(out, "pipeline.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
