#!/usr/bin/env python3
"""bf16 against FP8 from gemma2-bench --out files: a markdown table and an SVG of grouped bars.

    python3 tools/precision_table.py --out PREFIX LABEL=bench.json [LABEL=bench.json ...]

Each file is one column (weights and KV cache as its JSON says); each row one of issue 16's
shapes (decode batch 1/16/64 at 128 and 2048 positions, prefill 512 and 2048), in ms per step
with the achieved TB/s (decode) or TFLOP/s (prefill) and its fraction of the file's ceiling, and
issue 16's target where it has one. Writes PREFIX.md and PREFIX.svg; rows a file lacks are blank.
"""
import argparse
import json
import sys

ROWS = [("decode", 1, 128), ("decode", 16, 128), ("decode", 64, 128), ("decode", 1, 2048),
        ("decode", 16, 2048), ("decode", 64, 2048), ("prefill", 1, 512), ("prefill", 1, 2048)]
# Issue 16's targets (ms): FP8 weights; the 2048-position batch-64 row with the FP8 KV cache.
TARGETS = {("decode", 1, 128): 7.5, ("decode", 16, 128): 8.5, ("decode", 64, 128): 10.0,
           ("decode", 64, 2048): 15.0, ("prefill", 1, 2048): 120.0}
COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]


def row_name(kind, batch, tokens):
    return f"decode b{batch} p{tokens}" if kind == "decode" else f"prefill {tokens}"


def load(spec):
    label, sep, path = spec.rpartition("=")
    if not sep or not path:
        raise ValueError(f"expected LABEL=FILE, got {spec!r}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        cells = {}
        for r in d.get("results", []):
            if r.get("kind") == "decode":
                cells[("decode", r["batch"], r["prompt"])] = r
            elif r.get("kind") == "prefill":
                cells[("prefill", r.get("batch", 1), r["tokens"])] = r
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a gemma2-bench --out file ({type(e).__name__} {e})") from e
    return label, d, cells


def ms(r):
    return r.get("ms_per_step", r.get("ms")) if r else None


def cell_text(r):
    if r is None:
        return ""
    if r["kind"] == "decode":
        rate = f"{r['hbm_tb_per_s']:.2f} TB/s {100 * r['hbm_ceiling_fraction']:.0f}%"
    else:
        rate = f"{r['tflops']:.0f} TF/s {100 * r['gemm_ceiling_fraction']:.0f}%"
    return f"{ms(r):.2f} ({rate})"


def svg(columns, path):
    width, height, left, bottom, top = 900, 420, 60, 70, 40
    rows = [k for k in ROWS if any(k in cells for _, _, cells in columns)]
    plot_w, plot_h = width - left - 20, height - bottom - top
    # Each row scaled to its own largest bar (decode and prefill differ by 10x): bars show ratios.
    group_w = plot_w / max(1, len(rows))
    bar_w = group_w * 0.8 / max(1, len(columns))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">ms per step, '
           'each group scaled to its largest bar (target: black tick)</text>']
    for g, key in enumerate(rows):
        values = [ms(cells.get(key)) for _, _, cells in columns]
        top_value = max([v for v in values if v] + [TARGETS.get(key, 0)])
        x0 = left + g * group_w + group_w * 0.1
        for i, v in enumerate(values):
            if not v:
                continue
            h = plot_h * v / top_value
            x = x0 + i * bar_w
            out.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                       f'height="{h:.1f}" fill="{COLORS[i % len(COLORS)]}"/>')
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 3:.1f}" '
                       f'text-anchor="middle" font-size="9">{v:.1f}</text>')
        if key in TARGETS:
            y = top + plot_h - plot_h * TARGETS[key] / top_value
            out.append(f'<line x1="{x0:.1f}" x2="{x0 + bar_w * len(columns):.1f}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="black" stroke-width="2"/>')
        out.append(f'<text x="{x0 + bar_w * len(columns) / 2:.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle">{row_name(*key)}</text>')
    for i, (label, _, _) in enumerate(columns):
        y = height - bottom + 36 + 14 * (i // 3)
        x = left + 280 * (i % 3)
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" '
                   f'fill="{COLORS[i % len(COLORS)]}"/><text x="{x + 14}" y="{y}">{label}</text>')
    out.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes OUT.md and OUT.svg")
    ap.add_argument("columns", nargs="+", metavar="LABEL=FILE")
    args = ap.parse_args()
    try:
        columns = [load(c) for c in args.columns]
    except ValueError as e:
        print(f"precision_table: {e}", file=sys.stderr)
        return 1
    lines = ["| | " + " | ".join(label for label, _, _ in columns) + " | target |",
             "|---|" + "---|" * len(columns) + "---|"]
    for key in ROWS:
        if not any(key in cells for _, _, cells in columns):
            continue
        target = TARGETS.get(key)
        lines.append(f"| {row_name(*key)} | " +
                     " | ".join(cell_text(cells.get(key)) for _, _, cells in columns) +
                     f" | {'<= ' + format(target, 'g') if target else ''} |")
    lines.append("")
    for label, d, _ in columns:
        c = d.get("ceilings", {})
        lines.append(f"- {label}: weights {d.get('quantization', 'none')}, KV cache "
                     f"{d.get('kv_cache_dtype', 'auto')}, {d.get('model', '?')}; fractions of "
                     f"{c.get('hbm_tb_per_s', '?')} TB/s (decode) and {c.get('gemm_tflops', '?')} "
                     "TFLOP/s (prefill: the bf16 GEMM ceiling, which FP8 tensor cores exceed)")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    svg(columns, args.out + ".svg")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
