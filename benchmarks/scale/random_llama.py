#!/usr/bin/env python
"""A randomly initialised Llama checkpoint of a given shape (default: Llama-3-8B's), for scale runs.

Random weights say nothing about quality and everything about time and memory: the pipeline reads
the same shapes, bytes and layer count as from a real 8B checkpoint. Written as a local Hugging Face
directory (bfloat16 safetensors shards + config + tokenizer), which `model:` in a config accepts; in the
pipeline's dtype, prepare_model hard-links its shards instead of copying them (no second 16 GB).

    python benchmarks/scale/random_llama.py --out /tmp/llama8b --tokenizer-from results/model/<key>
    python benchmarks/scale/random_llama.py --out /tmp/tiny --tokenizer-from DIR --layers 2 --hidden 64 \
        --intermediate 128 --heads 4 --kv-heads 2 --vocab 49152                          # a quick CPU check

Llama-3-8B: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocabulary 128256
(8.03e9 parameters). The tokenizer is borrowed (any local HF tokenizer: the embedded SmolLM2's after
`glrs prepare-model`); its ids stay below its own vocabulary, which must not exceed --vocab. Each weight
is drawn from a seeded generator, N(0, 0.02^2) (norms: ones), tensor by tensor on the CPU in float32 and
stored as --dtype, so the peak memory is about one checkpoint in --dtype.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", required=True, help="a local HF directory with a tokenizer")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer_from)
    if len(tok) > args.vocab:
        sys.exit(f"the tokenizer of {args.tokenizer_from} has {len(tok)} ids, more than --vocab {args.vocab}")
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype=args.dtype,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    t0 = time.time()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype)
        else:
            state[name] = (0.02 * torch.randn(p.shape, generator=g)).to(dtype)
    model.load_state_dict(state, assign=True)
    model.to(dtype)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")  # complete or absent: a rerun after an interruption starts over
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    params = sum(t.numel() for t in state.values())
    (tmp / "random_llama.json").write_text(json.dumps(vars(args) | {"parameters": params,
                                                                   "seconds": round(time.time() - t0, 1)}, indent=1))
    tmp.rename(out)
    print(f"{out}: {params / 1e9:.2f}e9 parameters, {args.layers} layers, {args.dtype}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
