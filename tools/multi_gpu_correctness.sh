#!/usr/bin/env bash
# Issue 6, run 1 on a host with several GPUs: 27B shapes with random weights (first LAYERS layers,
# widths exact) at tensor parallel 2, 4, 8 through real worker processes over NCCL, against TP 1
# on the same GPUs: every logits row's relative L2 <= 2e-2 and identical greedy tokens where the
# top-2 margin exceeds 0.1; then a sequence classifier of the same widths (2 layers, a small
# vocabulary, random weights written by gemma2-make-checkpoint): its logits, the same bound, and
# the same labels.
#
#   source .gpu/env.sh && tools/multi_gpu_correctness.sh [LAYERS] [OUT_DIR]
set -euo pipefail
layers=${1:-4}
out=${2:-${OUT:-/tmp}/multi_gpu_correctness}
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
# compare.py TP1.json TPN.json TP: rows within 2e-2; tokens (generation) or labels (classifier).
# A TPN run without logits (ids only: the vocab-parallel pick on the devices) is compared by its
# tokens alone, against TP 1's rows for the margins.
cat > "$out/compare.py" <<'PY'
import json, math, sys
a, b, tp = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
worst = max((math.sqrt(sum((x - y) ** 2 for x, y in zip(r, s)) / sum(x * x for x in r))
             for r, s in zip(a["logits"], b.get("logits", []))), default=0.0)
ok = worst <= 2e-2
if "logits" not in b:
    tp += " (ids only)"
if "labels" in a:
    same = a["labels"] == b["labels"]
    ok = ok and same
    what = f"classifier tp {tp}: labels {'equal' if same else 'differ'}"
else:
    rows = a["logits"][len(a["prompt_ids"]) - 1:]
    for i, (r, ta, tb) in enumerate(zip(rows, a["generated_ids"], b["generated_ids"])):
        top = sorted(r, reverse=True)
        if top[0] - top[1] > 0.1 and ta != tb:
            ok = False
            print(f"tp {tp}: token {i} differs ({ta} vs {tb}) with margin {top[0] - top[1]:.3f}")
    what = f"tp {tp}: tokens {'equal' if a['generated_ids'] == b['generated_ids'] else 'differ'}"
print(f"{what}, worst row relative L2 {worst:.2e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
status=0
# run NAME ARGS...: TP 1, then each TP the host allows, each against TP 1.
# IDS_ONLY=1: the TP N runs leave out --logits (the last argument) and are compared with the TP 1
# run of the same arguments made before under the name REF.
run() {
  local name=$1; shift
  local ref=$name args=("$@")
  if [[ ${IDS_ONLY:-0} == 1 ]]; then
    ref=$REF
    unset 'args[-1]'
  else
    timeout 600 gemma2-run "$@" > "$out/${name}_tp1.json"
  fi
  for tp in 2 4 8; do
    ((tp <= gpus)) || { echo "$name tp $tp: skipped ($gpus GPUs)"; continue; }
    timeout 600 gemma2-run "${args[@]}" --launch local --tp "$tp" > "$out/${name}_tp$tp.json" || { status=1; continue; }
    python3 "$out/compare.py" "$out/${ref}_tp1.json" "$out/${name}_tp$tp.json" "$tp" || status=1
  done
}
lm=(--model "random:27b:1:$layers" --prompt-ids 2,651,6037,576,573,1370,4376,235336,109,1596,603,476
  --max-new-tokens 16 --ignore-eos --backend cuda --logits)
run lm "${lm[@]}"
IDS_ONLY=1 REF=lm run lm_ids "${lm[@]}"
cls=${CLS_DIR:-/tmp/gemma2_cls27b}  # 1.4 GB of random weights, kept out of the results
[[ -f $cls/config.json ]] || timeout 600 gemma2-make-checkpoint --out "$cls" --arch seqcls --labels 5 \
  --vocab 1024 --hidden 4608 --layers 2 --heads 32 --kv-heads 16 --head-dim 128 --intermediate 36864 --seed 7
run cls --model "$cls" --prompt-ids 2,17,301,44,999,5,88,612,7 --backend cuda
exit $status
