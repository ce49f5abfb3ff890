#!/usr/bin/env python3
"""Builds tiny random Gemma 2 checkpoints with Hugging Face transformers and records its outputs.

Each case directory gets a checkpoint as transformers reads it (config.json, safetensors, maybe
shards + index) and reference.safetensors with prompt_ids, generated_ids (greedy, no eos stop)
and logits: one row per predicted position (every prompt position, then every generated token but
the last) for causal LMs; the pooled row (sequence classifier) or every row (token classifier).

Parameters are rounded to bf16 (the checkpoint stores them exactly); the reference math and the
buffers stay fp32: casting the whole module to bf16 and back would also round RoPE's inv_freq.

  python3 tools/make_references.py --out tests/data/references          # the committed cases
  python3 tools/make_references.py --random 12 --seed 7 --out /tmp/extra  # fresh random family members
  python3 tools/make_references.py --only 27b_widths_3layers,hd256_window64 --out /tmp/fp8large

The last two (issue 16's FP8 numerics, on a CUDA host: fp32 on the GPU with TF32 off) also write
CASE_fp8: the projections block-quantized as transformers' FineGrainedFP8 saves them (E4M3 and a
weight_scale_inv per 128x128 block = the block's max |w| / 448), and in its reference's metadata
the anchor: the worst row of those dequantized weights run by transformers in bf16 (parameters
rounded to bf16, RoPE's buffers fp32) against the same fp32 logits, plus plain bf16's.
"""
import argparse
import copy
import json
import os
import random
import re
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification,
                          Gemma2ForTokenClassification)
from transformers.models.gemma2 import modeling_gemma2

CLASSES = {"causal": Gemma2ForCausalLM, "seqcls": Gemma2ForSequenceClassification,
           "tokcls": Gemma2ForTokenClassification}

# Committed cases: together they cover GQA and MHA, a window shorter than the prompt,
# query_pre_attn_scalar != head_dim, softcaps that bite, prompts of a few hundred tokens, shards,
# both config dialects, fp32 and bf16 files and both classifier heads.
CASES = {
    "gqa4_window_published": dict(arch="causal", vocab=384, hidden=64, layers=4, heads=8, kv=2,
                                  head_dim=16, inter=128, window=24, qpas=24, prompt=230, new=8,
                                  dialect="published", shards=1, dtype="bf16", seed=1),
    "mha_sharded_new_f32": dict(arch="causal", vocab=320, hidden=48, layers=3, heads=4, kv=4,
                                head_dim=12, inter=96, window=16, qpas=12, prompt=90, new=6,
                                dialect="new", shards=3, dtype="f32", seed=2,
                                layer_types=["full_attention", "sliding_attention",
                                             "sliding_attention"]),
    "head32_qpas16_new": dict(arch="causal", vocab=300, hidden=64, layers=2, heads=4, kv=2,
                              head_dim=32, inter=64, window=64, qpas=16, prompt=120, new=6,
                              dialect="new", shards=1, dtype="bf16", seed=3),
    "seqcls_published": dict(arch="seqcls", labels=3, vocab=256, hidden=48, layers=3, heads=4,
                             kv=2, head_dim=16, inter=96, window=16, qpas=16, prompt=40,
                             trailing_pad=3, dialect="published", shards=1, dtype="bf16", seed=4),
    "tokcls_new": dict(arch="tokcls", labels=5, vocab=256, hidden=48, layers=2, heads=2, kv=1,
                       head_dim=24, inter=96, window=8, qpas=20, prompt=33, dialect="new",
                       shards=2, dtype="bf16", seed=5),
    # Gemma 2's real head sizes (the cuda kernels support only these): 27B-like (head_dim 128,
    # query_pre_attn_scalar = hidden / heads) and 2B/9B-like (head_dim 256).
    "hd128_27b_like": dict(arch="causal", vocab=512, hidden=128, layers=3, heads=4, kv=2,
                           head_dim=128, inter=256, window=40, qpas=32, prompt=150, new=8,
                           dialect="published", shards=1, dtype="bf16", seed=6, std=0.25),
    "hd256_mha_new": dict(arch="causal", vocab=400, hidden=64, layers=2, heads=2, kv=2,
                          head_dim=256, inter=128, window=33, qpas=256, prompt=100, new=8,
                          dialect="new", shards=1, dtype="bf16", seed=7, std=0.2),
    "hd128_seqcls": dict(arch="seqcls", labels=4, vocab=300, hidden=64, layers=2, heads=2, kv=1,
                         head_dim=128, inter=128, window=16, qpas=32, prompt=60, trailing_pad=2,
                         dialect="new", shards=1, dtype="bf16", seed=8, std=0.25),
}

# Not committed (gigabytes): the 27B shape cut to a few layers, widths exact, for the cuda engine.
LARGE_CASES = {
    "27b_shape_2layers": dict(arch="causal", vocab=256000, hidden=4608, layers=2, heads=32, kv=16,
                              head_dim=128, inter=36864, window=4096, qpas=144, prompt=64, new=2,
                              dialect="published", shards=4, dtype="bf16", seed=27, std=0.02,
                              embed_std=1.0, last_only=True),
    # Issue 16's two FP8 shapes, 48 tokens decoded past the prompt, each with a CASE_fp8 twin.
    "27b_widths_3layers": dict(arch="causal", vocab=256000, hidden=4608, layers=3, heads=32, kv=16,
                               head_dim=128, inter=36864, window=4096, qpas=144, prompt=300,
                               new=48, dialect="published", shards=4, dtype="bf16", seed=28,
                               std=0.02, embed_std=1.0, last_only=True, fp8=True, device="cuda"),
    "hd256_window64": dict(arch="causal", vocab=256000, hidden=2304, layers=3, heads=8, kv=4,
                           head_dim=256, inter=9216, window=64, qpas=256, prompt=399, new=48,
                           dialect="published", shards=2, dtype="bf16", seed=29, std=0.02,
                           embed_std=1.0, last_only=True, fp8=True, device="cuda"),
}

# The projections transformers' FineGrainedFP8 quantizes (embeddings and norms stay bf16).
PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
FP8_BLOCK = 128

STATS = {"attn_score_max": 0.0}


def instrument_attention():
    """Records the largest |score| before the attention softcap, to show that the softcap bites."""
    original = modeling_gemma2.eager_attention_forward

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        try:
            k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
            scores = torch.matmul(query, k.transpose(2, 3)) * module.scaling
            STATS["attn_score_max"] = max(STATS["attn_score_max"], scores.abs().max().item())
        except Exception as e:  # statistics only; never change the reference
            print("note: attention statistics unavailable:", e, file=sys.stderr)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    modeling_gemma2.eager_attention_forward = wrapped


def make_config(c):
    layer_types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c["layers"])]
    kw = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
              num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
              num_key_value_heads=c["kv"], head_dim=c["head_dim"], sliding_window=c["window"],
              query_pre_attn_scalar=c["qpas"], max_position_embeddings=1024,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
              hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
              layer_types=layer_types, tie_word_embeddings=True)
    if c["arch"] != "causal":
        kw["num_labels"] = c["labels"]
        kw["id2label"] = {i: f"label_{chr(97 + i)}" for i in range(c["labels"])}
        kw["label2id"] = {v: k for k, v in kw["id2label"].items()}
    cfg = Gemma2Config(**kw)
    cfg.architectures = [CLASSES[c["arch"]].__name__]
    return cfg, layer_types


def published_config_json(c, cfg, layer_types):
    """config.json as Google published gemma-2 checkpoints: top-level rope_theta, hidden_act,
    torch_dtype, no layer_types (so the model must use the default even/odd pattern)."""
    assert layer_types == ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(c["layers"])]
    j = {"architectures": cfg.architectures, "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
         "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": c["head_dim"],
         "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
         "hidden_size": c["hidden"], "initializer_range": 0.02, "intermediate_size": c["inter"],
         "max_position_embeddings": 1024, "model_type": "gemma2",
         "num_attention_heads": c["heads"], "num_hidden_layers": c["layers"],
         "num_key_value_heads": c["kv"], "pad_token_id": 0, "query_pre_attn_scalar": c["qpas"],
         "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": c["window"],
         "sliding_window_size": c["window"], "torch_dtype": "bfloat16",
         "transformers_version": "4.42.4", "use_cache": True, "vocab_size": c["vocab"]}
    if c["arch"] != "causal":
        j["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
        j["label2id"] = dict(cfg.label2id)
    return j


def init_params(model, c):
    """Large random init so both softcaps bite; parameters rounded to bf16, buffers untouched."""
    g = torch.Generator().manual_seed(c["seed"])
    std = c.get("std", 0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                s = c.get("embed_std", 2.0)
            elif "norm" in name:
                s = 0.1
            else:
                s = std
            p.copy_(torch.randn(p.shape, generator=g) * s)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def save_checkpoint(model, c, cfg, layer_types, out_dir):
    save_dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[c["dtype"]]
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "inv_freq" in name:
            continue
        tensors[name] = t.detach().to(save_dtype).contiguous().clone()
    names = sorted(tensors)
    shards = c.get("shards", 1)
    if shards <= 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        per = (len(names) + shards - 1) // shards
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if c["dialect"] == "published":
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(published_config_json(c, cfg, layer_types), f, indent=2)
    else:
        cfg.dtype = c["dtype"] == "f32" and "float32" or "bfloat16"
        cfg.save_pretrained(out_dir)  # transformers' own, current dialect


def load_reference_model(c, out_dir, fallback):
    """The reference is the checkpoint as transformers loads it from disk, in fp32, eager."""
    cls = CLASSES[c["arch"]]
    try:
        m = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
        for (n1, p1), (n2, p2) in zip(m.state_dict().items(), fallback.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), f"reloaded parameter {n1} differs"
    except Exception as e:
        print(f"note: from_pretrained failed ({e}); using the in-memory model", file=sys.stderr)
        m = fallback
    m.eval()
    assert m.config._attn_implementation == "eager", m.config._attn_implementation
    for n, b in m.named_buffers():
        assert b.dtype == torch.float32, (n, b.dtype)
    return m


def make_case(name, c, root):
    out_dir = os.path.join(root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    cfg, layer_types = make_config(c)
    torch.manual_seed(c["seed"])
    cls = CLASSES[c["arch"]]
    try:
        model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    except TypeError:  # a transformers without the dtype keyword
        model = cls._from_config(cfg, attn_implementation="eager")
    model = model.float()  # parameters only matter here; buffers are recomputed on load
    init_params(model, c)
    save_checkpoint(model, c, cfg, layer_types, out_dir)
    ref = load_reference_model(c, out_dir, model)
    dev = torch.device("cuda" if c.get("device") == "cuda" and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
        ref = ref.to(dev)

    rng = random.Random(c["seed"] * 1000 + 17)
    prompt = [2] + [rng.randrange(4, c["vocab"]) for _ in range(c["prompt"] - 1)]
    prompt += [0] * c.get("trailing_pad", 0)
    STATS["attn_score_max"] = 0.0
    out = {"prompt_ids": torch.tensor(prompt, dtype=torch.int64)}
    meta = {"case": name, "arch": c["arch"], "transformers": transformers.__version__,
            "torch": torch.__version__, "config": json.dumps(c)}
    with torch.no_grad():
        if c["arch"] == "causal":
            ids = list(prompt)
            margins = []
            for _ in range(c["new"]):
                logits = ref(torch.tensor([ids], device=dev)).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                margins.append(float(top2[0] - top2[1]))
                ids.append(int(torch.argmax(logits)))
            generated = ids[len(prompt):]
            tokens = torch.tensor([prompt + generated[:-1]], device=dev)
            full = ref(tokens).logits[0]
            hidden = ref.model(tokens).last_hidden_state[0]
            if c.get("last_only"):  # large vocabularies: keep the rows that choose each token
                full = full[len(prompt) - 1:]
                hidden = hidden[len(prompt) - 1:]
                meta["first_row"] = str(len(prompt) - 1)
            raw = hidden @ ref.get_input_embeddings().weight.T  # before the final softcap
            meta["logit_max_before_softcap"] = f"{raw.abs().max().item():.3f}"
            meta["min_top2_margin"] = f"{min(margins):.4f}"
            out["generated_ids"] = torch.tensor(generated, dtype=torch.int64)
            out["logits"] = full.float().cpu().contiguous()
        else:
            logits = ref(torch.tensor([prompt], device=dev)).logits
            out["logits"] = (logits[0] if c["arch"] == "tokcls" else logits).float().cpu().contiguous()
            out["generated_ids"] = torch.zeros(0, dtype=torch.int64)
    meta["attn_score_max_before_softcap"] = f"{STATS['attn_score_max']:.3f}"
    save_file(out, os.path.join(out_dir, "reference.safetensors"), metadata=meta)
    print(f"{name}: logits {tuple(out['logits'].shape)}, " +
          ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("config", "case")))
    if c.get("fp8"):
        make_fp8_twin(name, c, root, cfg, layer_types, ref, tokens, out, meta)
    return meta


def fp8_block_quantize(w):
    """E4M3 and one scale per 128x128 block (scale = max |w| / 448, 1 for a zero block): the
    weight and weight_scale_inv transformers' FineGrainedFP8 saves."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, (-cols) % FP8_BLOCK, 0, (-rows) % FP8_BLOCK))
    br, bc = padded.shape[0] // FP8_BLOCK, padded.shape[1] // FP8_BLOCK
    blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(padded.shape)[:rows, :cols].contiguous(), scale.float().contiguous()


def fp8_block_dequantize(q, scale):
    s = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return q.float() * s[:q.shape[0], :q.shape[1]].to(q.device)


def worst_row(logits, ref_rows):
    err = (logits.float() - ref_rows).norm(dim=1) / ref_rows.norm(dim=1).clamp_min(1e-30)
    return float(err.max())


def make_fp8_twin(name, c, root, cfg, layer_types, ref, tokens, out, meta):
    """CASE_fp8: the FP8 checkpoint, the same fp32 reference, and the bf16 anchors' worst rows."""
    twin = os.path.join(root, name + "_fp8")
    shutil.rmtree(twin, ignore_errors=True)
    os.makedirs(twin)
    tensors, dequantized = {}, {}
    for n, t in ref.state_dict().items():
        if "inv_freq" in n or (n == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if PROJECTION.match(n):
            q, scale = fp8_block_quantize(t.detach().float().cpu())
            tensors[n] = q
            tensors[n[:-len("weight")] + "weight_scale_inv"] = scale
            dequantized[n] = fp8_block_dequantize(q, scale)
        else:
            tensors[n] = t.detach().to(torch.bfloat16).cpu().contiguous()
    save_file(tensors, os.path.join(twin, "model.safetensors"), metadata={"format": "pt"})
    j = published_config_json(c, cfg, layer_types)
    j["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(twin, "config.json"), "w") as f:
        json.dump(j, f, indent=2)
    first = int(meta.get("first_row", "0"))
    dev = next(ref.parameters()).device
    fp32_rows = out["logits"].to(dev)

    def bf16_worst(weights):  # parameters rounded to bf16; buffers (RoPE) stay fp32
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in weights:
                    p.copy_(weights[n].to(dev))
                p.data = p.data.to(torch.bfloat16)
        logits = m(tokens).logits[0][first:]
        worst = worst_row(logits, fp32_rows)
        del m
        return worst

    twin_meta = dict(meta)
    twin_meta["case"] = name + "_fp8"
    twin_meta["base_case"] = name
    twin_meta["fp8_scheme"] = "E4M3, weight_scale_inv per 128x128 block = max|w| / 448"
    twin_meta["fp8_anchor_worst"] = f"{bf16_worst(dequantized):.6f}"
    twin_meta["bf16_anchor_worst"] = f"{bf16_worst({}):.6f}"
    save_file(out, os.path.join(twin, "reference.safetensors"), metadata=twin_meta)
    print(f"{name}_fp8: transformers bf16 on the dequantized FP8 weights, worst row "
          f"{twin_meta['fp8_anchor_worst']}; on the bf16 weights {twin_meta['bf16_anchor_worst']}")


def random_case(rng, i):
    heads = rng.choice([2, 4, 8])
    kv = rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0])
    head_dim = rng.choice([8, 16, 32])
    layers = rng.randint(1, 4)
    c = dict(arch=rng.choice(["causal", "causal", "seqcls", "tokcls"]), labels=rng.randint(2, 6),
             vocab=rng.randint(64, 400), hidden=rng.choice([32, 48, 64]), layers=layers,
             heads=heads, kv=kv, head_dim=head_dim, inter=rng.choice([32, 64, 96, 128]),
             window=rng.randint(4, 64), qpas=rng.choice([head_dim, 12, 20, 33]),
             prompt=rng.randint(5, 150), new=rng.randint(1, 8), dialect=rng.choice(["new", "published"]),
             shards=rng.choice([1, 2]), dtype=rng.choice(["bf16", "bf16", "f32"]), seed=1000 + i,
             std=rng.choice([0.05, 0.5]), trailing_pad=rng.choice([0, 0, 2]))
    if c["dialect"] == "new" and rng.random() < 0.5:
        c["layer_types"] = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(layers)]
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=0, help="make N random cases instead of the committed ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    instrument_attention()
    os.makedirs(args.out, exist_ok=True)
    if args.random:
        rng = random.Random(args.seed)
        cases = {f"random_{args.seed}_{i:02d}": random_case(rng, i) for i in range(args.random)}
    else:
        pool = {**CASES, **LARGE_CASES} if args.only else CASES
        cases = {k: v for k, v in pool.items() if not args.only or k in args.only.split(",")}
    failed = []
    for name, c in cases.items():
        try:
            make_case(name, c, args.out)
        except Exception as e:
            import traceback
            traceback.print_exc()
            failed.append(name)
    if failed:
        sys.exit(f"failed cases: {failed}")


if __name__ == "__main__":
    main()
