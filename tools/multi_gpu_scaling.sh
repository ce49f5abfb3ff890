#!/usr/bin/env bash
# Issue 6, run 2 on a host with several GPUs: gemma2-bench of 27B shapes (random weights) at
# tensor parallel 1, 2, 4, 8 through real worker processes (NCCL), then a table and an SVG plot of
# ms/token and tokens/s per GPU against TP with the weight-streaming floor.
#
#   source .gpu/env.sh && tools/multi_gpu_scaling.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-/tmp}/multi_gpu_scaling}
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
for tp in 1 2 4 8; do
  ((tp <= gpus)) || { echo "tp $tp: skipped ($gpus GPUs)"; continue; }
  timeout 900 gemma2-bench --preset 27b --random-weights 1 --backend cuda --launch local --tp "$tp" \
    --batches 1,16,64 --prompts 128 --prefills 2048 --out "$out/tp$tp.json" | tee "$out/tp$tp.txt"
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = sorted((json.load(open(f)) for f in glob.glob(os.path.join(out, "tp*.json"))), key=lambda d: d["tp"])
rows, series = [], {}
for d in runs:
    for r in d["results"]:
        if r.get("kind") == "decode" and "ms_per_step" in r:
            rows.append((d["tp"], r["batch"], r["ms_per_step"], r["tokens_per_s"] / d["tp"], r["floor_ms"]))
            series.setdefault(r["batch"], []).append((d["tp"], r["ms_per_step"], r["floor_ms"]))
with open(os.path.join(out, "scaling.md"), "w") as f:
    f.write("| TP | batch | ms/step | tok/s per GPU | floor ms |\n|---|---|---|---|---|\n")
    for tp, b, ms, tps, floor in rows:
        f.write(f"| {tp} | {b} | {ms:.2f} | {tps:.0f} | {floor:.2f} |\n")
# Two log-scale panels against TP, one line per batch, the weight-streaming floor dashed:
# ms/step (left) and tokens/s per GPU (right; the floor's rate is batch / floor / TP).
import math
W, H, L, B, PW = 980, 420, 60, 50, 440
tps = sorted({t for s in series.values() for t, _, _ in s}) or [1]
colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<text x="{W/2}" y="16" text-anchor="middle">Gemma 2 27B decode against tensor parallelism (dashed: weight-streaming floor)</text>']
def panel(x0, title, value):  # value(tp, ms, floor_ms, batch) -> (measured, floor)
    pts = {b: [(t,) + value(t, ms, f, b) for t, ms, f in s] for b, s in series.items()}
    ys = [v for p in pts.values() for _, a, c in p for v in (a, c)] or [1]
    lo, hi = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
    lx = lambda t: x0 + L + (PW - L - 20) * (math.log2(t) / max(1, math.log2(max(tps))))
    ly = lambda v: H - B - (H - B - 40) * (math.log10(v) - lo) / (hi - lo)
    svg.append(f'<text x="{x0 + PW/2}" y="36" text-anchor="middle">{title}</text>')
    for t in tps:
        svg.append(f'<text x="{lx(t)}" y="{H-B+18}" text-anchor="middle">TP {t}</text>')
    for i, (b, p) in enumerate(sorted(pts.items())):
        c = colors[i % len(colors)]
        line = " ".join(f"{lx(t):.1f},{ly(a):.1f}" for t, a, _ in p)
        floor = " ".join(f"{lx(t):.1f},{ly(f):.1f}" for t, _, f in p)
        svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{line}"/>')
        svg.append(f'<polyline fill="none" stroke="{c}" stroke-dasharray="4 3" points="{floor}"/>')
        for t, a, _ in p:
            svg.append(f'<text x="{lx(t)+4:.1f}" y="{ly(a)-4:.1f}" fill="{c}">{a:.1f}</text>' if a < 100
                       else f'<text x="{lx(t)+4:.1f}" y="{ly(a)-4:.1f}" fill="{c}">{a:.0f}</text>')
        svg.append(f'<text x="{x0 + PW - 90}" y="{60+16*i}" fill="{c}">batch {b}</text>')
panel(0, "ms per step", lambda t, ms, f, b: (ms, f))
panel(PW + 60, "tokens/s per GPU", lambda t, ms, f, b: (1000 * b / ms / t, 1000 * b / f / t))
svg.append("</svg>")
open(os.path.join(out, "scaling.svg"), "w").write("\n".join(svg))
print(open(os.path.join(out, "scaling.md")).read())
PY
