#!/usr/bin/env python3
"""Side-by-side table of one device call: gemma2-bench's JSON against tools/bench_hf.py's (eager,
and static cache + torch.compile), decode rows matched on (batch, prompt).

  python3 tools/side_by_side.py ours.json hf_eager.json hf_compiled.json > side_by_side.md
"""
import json
import sys


def prefill_rows(path):
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for r in doc.get("results", []):
        if r.get("kind") == "prefill":
            out[r["tokens"]] = r["ms"]
        elif r.get("kind") == "decode" and r.get("batch") == 1 and "prefill_ms" in r:
            out[r["prompt"]] = r["prefill_ms"]  # generate() of one new token: prefill + one step
    return out


def decode_rows(path):
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"<!-- {path}: {e} -->")
        return {}, {}
    rows = {(r["batch"], r["prompt"]): r for r in doc.get("results", []) if r.get("kind") == "decode"}
    return rows, doc


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ours, ours_doc = decode_rows(sys.argv[1])
    others = [decode_rows(p) for p in sys.argv[2:]]
    names = []
    for rows, doc in others:
        path = next(iter(rows.values()))["path"] if rows else "?"
        names.append(f"HF {path}")
    print(f"ours: {ours_doc.get('model', '?')}, {ours_doc.get('layers', '?')} layers; "
          + "; ".join(f"{n}: transformers {d.get('transformers', '?')}, torch {d.get('torch', '?')}, "
                      f"{d.get('layers', '?')} layers" for n, (_, d) in zip(names, others)))
    print()
    head = "| batch | prompt | ours ms/step | " + " | ".join(f"{n} ms/step | ratio" for n in names) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(names)))
    for key in sorted(set(ours) | {k for rows, _ in others for k in rows}):
        mine = ours.get(key, {}).get("ms_per_step")
        cells = [str(key[0]), str(key[1]), f"{mine:.2f}" if mine else "—"]
        for rows, _ in others:
            theirs = rows.get(key, {}).get("ms_per_step")
            cells.append(f"{theirs:.2f}" if theirs else "—")
            cells.append(f"{theirs / mine:.2f}x" if theirs and mine else "—")
        print("| " + " | ".join(cells) + " |")
    ours_p = prefill_rows(sys.argv[1])
    theirs_p = [prefill_rows(p) for p in sys.argv[2:]]
    common = sorted(t for t in ours_p if any(t in p for p in theirs_p))
    if common:
        print()
        print("Prefill, batch 1 (HF: generate() of one new token, so prefill plus one step):")
        print()
        print("| tokens | ours ms | " + " | ".join(f"{n} ms | ratio" for n in names) + " |")
        print("|" + "---|" * (2 + 2 * len(names)))
        for t in common:
            cells = [str(t), f"{ours_p[t]:.2f}"]
            for p in theirs_p:
                cells += [f"{p[t]:.2f}", f"{p[t] / ours_p[t]:.2f}x"] if t in p else ["—", "—"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
