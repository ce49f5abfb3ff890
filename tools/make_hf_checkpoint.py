#!/usr/bin/env python3
"""Writes a random-weight Gemma 2 checkpoint of a preset's shapes with transformers' own
save_pretrained (safetensors shards + index + config.json, as a downloaded model has them).

Weights are drawn on the GPU (seconds, where gemma2-make-checkpoint's portable generator takes
minutes at 9B), so tools/load_speed.sh spends its device time on loading, not on writing.

  python3 tools/make_hf_checkpoint.py --preset 9b --out /tmp/ckpt [--shard-size 5GB]
"""
import argparse
import time

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from bench_hf import PRESETS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="9b", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    cfg = Gemma2Config(**PRESETS[args.preset], vocab_size=256000, sliding_window=4096,
                       max_position_embeddings=8192, torch_dtype="bfloat16")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = Gemma2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size=args.shard_size)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"wrote {args.preset}: {n / 1e9:.2f} GB of parameters in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
