#!/usr/bin/env python3
"""Where a served run's time went, from its step timeline (gemma2-launch --trace FILE).

    python3 tools/trace_summary.py TRACE.json [--slow-ms 55] [--flop-per-token F]

Splits the steps three ways: the first step of each shape (tokens, sequences, logits rows: a
new shape may time cuBLASLt candidates or capture a CUDA graph), decode-only repeats and mixed
(prefill) repeats; for each, the count, total seconds and p50/p90/max milliseconds, and with
--flop-per-token (e.g. 54.4e9 for 27B) the achieved TFLOP/s. Then how many steps exceed
--slow-ms and how many of those are first occurrences, and the scheduler's host phases
(schedule, submit, apply). A trace whose server was killed (its JSON array left open) reads too.
"""
import argparse
import json
import sys


def load_events(path):
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        events = json.loads(text)
    except json.JSONDecodeError:
        # Still open, as a running or killed server leaves it; a kill mid-write may also have cut
        # the last event short, so that line is dropped if the rest then reads.
        lines = text.splitlines()
        for keep in (len(lines), len(lines) - 1):
            try:
                events = json.loads("\n".join(lines[:keep]).rstrip().rstrip(",") + "]")
                break
            except json.JSONDecodeError:
                if keep == len(lines) - 1:
                    raise
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    return [e for e in events if isinstance(e, dict) and "name" in e]


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--slow-ms", type=float, default=55.0)
    ap.add_argument("--flop-per-token", type=float, default=0.0)
    args = ap.parse_args()
    try:
        events = load_events(args.trace)
    except (OSError, ValueError) as e:
        print(f"trace_summary: cannot read {args.trace}: {e}", file=sys.stderr)
        return 1
    try:
        return summarize(events, args)
    except (KeyError, TypeError, ValueError) as e:
        print(f"trace_summary: {args.trace} is not a step trace: {type(e).__name__} {e}",
              file=sys.stderr)
        return 1


def summarize(events, args):
    steps = sorted((e for e in events if e["name"] == "step"), key=lambda e: e["ts"])
    if not steps:
        raise ValueError("no steps")
    seen = set()
    groups = {"first of its shape": [], "decode repeat": [], "mixed repeat": []}
    slow = slow_first = 0
    for e in steps:
        a = e["args"]
        shape = (a["tokens"], a["sequences"], a["outputs"])
        first = shape not in seen
        seen.add(shape)
        if first:
            group = "first of its shape"
        elif a["tokens"] == a["sequences"]:
            group = "decode repeat"
        else:
            group = "mixed repeat"
        groups[group].append(e)
        if e["dur"] / 1e3 > args.slow_ms:
            slow += 1
            slow_first += first
    span = (steps[-1]["ts"] + steps[-1]["dur"] - steps[0]["ts"]) / 1e6
    print(f"{len(steps)} steps over {span:.2f} s, {len(seen)} shapes")
    header = f"{'steps':<20}{'count':>7}{'total s':>10}{'p50 ms':>9}{'p90 ms':>9}{'max ms':>9}"
    print(header + ("  TFLOP/s" if args.flop_per_token else ""))
    for name, group in groups.items():
        ms = sorted(e["dur"] / 1e3 for e in group)
        total = sum(ms) / 1e3
        line = (f"{name:<20}{len(group):>7}{total:>10.2f}{percentile(ms, 0.5):>9.1f}"
                f"{percentile(ms, 0.9):>9.1f}{(ms[-1] if ms else 0):>9.1f}")
        if args.flop_per_token and total > 0:
            tokens = sum(e["args"]["tokens"] for e in group)
            line += f"{tokens * args.flop_per_token / total / 1e12:>9.1f}"
        print(line)
    print(f"steps over {args.slow_ms:g} ms: {slow}, of which first of their shape: {slow_first}")
    for phase in ("schedule", "submit", "apply"):
        us = [e["dur"] for e in events if e["name"] == phase]
        if us:
            print(f"host {phase}: {sum(us) / 1e6:.3f} s in all, {sum(us) / len(us):.0f} us a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
