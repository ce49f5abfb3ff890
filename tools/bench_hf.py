#!/usr/bin/env python3
"""Hugging Face transformers on the same GPU and shapes as gemma2-bench, for side-by-side ratios.

Random bf16 Gemma 2 weights of a preset's shape (no download), greedy generate(), ms per decoded
token = (time(generate N new) - time(generate 1 new)) / (N - 1), median of --repeat runs.

  python3 tools/bench_hf.py --preset 27b --batches 1,16 --prompt 128 --out hf.json
  python3 tools/bench_hf.py --preset 27b --batches 1,16 --prompt 128 --compile   # static cache, compiled by generate()
  python3 tools/bench_hf.py --preset 27b --shapes 1x128,16x128,64x512          # batch x prompt pairs
"""
import argparse
import json
import statistics
import time

import torch
import torch._dynamo
from transformers import Gemma2Config, Gemma2ForCausalLM

PRESETS = {
    "2b": dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
               head_dim=256, intermediate_size=9216, query_pre_attn_scalar=256),
    "9b": dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
               head_dim=256, intermediate_size=14336, query_pre_attn_scalar=256),
    "27b": dict(hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                head_dim=128, intermediate_size=36864, query_pre_attn_scalar=144),
}


def timed_generate(model, ids, new, **kw):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="27b")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--shapes", default="", help="BATCHxPROMPT,... (instead of --batches/--prompt)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="static cache (generate() compiles the forward)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    kw = dict(PRESETS[args.preset], vocab_size=256000, sliding_window=4096, max_position_embeddings=8192)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    cfg = Gemma2Config(**kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16)
    model.eval()
    gen_kw = {}
    if args.compile:
        # generate() compiles the decoding forward itself (CUDA graphs) once the cache is static;
        # compiling model.forward on top of that fails on the graphs' reused outputs.
        gen_kw["cache_implementation"] = "static"
    results = []
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(int(b), args.prompt) for b in args.batches.split(",")]
    for b, prompt in shapes:
        ids = torch.randint(4, 256000, (b, prompt), device="cuda")
        ids[:, 0] = 2
        with torch.no_grad():
            # Warm-up as long as the timed runs: generate() compiles its decoding forward lazily,
            # and a shorter warm-up left that compile inside the timed runs.
            timed_generate(model, ids, args.new_tokens, **gen_kw)
            one = [timed_generate(model, ids, 1, **gen_kw) for _ in range(args.repeat)]
            full = [timed_generate(model, ids, args.new_tokens, **gen_kw) for _ in range(args.repeat)]
        ms = (statistics.median(full) - statistics.median(one)) / (args.new_tokens - 1)
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        path = "eager" if not args.compile else "static+compile" if graphs else "static (not compiled)"
        r = {"kind": "decode", "batch": b, "prompt": prompt, "ms_per_step": ms, "path": path,
             "dynamo_graphs": graphs, "prefill_ms": statistics.median(one)}
        print(f"hf {r['path']:15s} batch {b:3d} prompt {prompt}: {ms:.2f} ms/step", flush=True)
        results.append(r)
    doc = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
           "preset": args.preset, "layers": cfg.num_hidden_layers, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
