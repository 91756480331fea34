"""Dequantise a GGUF into a Hugging Face model directory whose tokenizer comes from elsewhere:
    python benchmarks/gpu/gguf_to_hf.py MODEL.gguf TOKENIZER_DIR OUT_DIR [--dtype bfloat16]

Why: a transformers version may load a GGUF's weights right and still convert its tokenizer wrongly (issue 24:
the GPU image's transformers 5.17 cut text into ~1 token a byte with Gemma 3's GGUF; `glrs prepare-model`
refuses such a tokenizer). Saving the tokenizer with a version that converts it (e.g. transformers 5.25:
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(TOKENIZER_DIR)) and the weights here
gives a directory that `glrs prepare-model` / `model=OUT_DIR` take as a local model, tokenizer check included.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from glrs.modelio import load_gguf_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    model = load_gguf_model(a.gguf, getattr(torch, a.dtype))
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in a.tokenizer_dir.iterdir():
        shutil.copyfile(f, tmp / f.name)
    tmp.rename(a.out)
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()):,} parameters, model type {model.config.model_type}")


if __name__ == "__main__":
    main()
