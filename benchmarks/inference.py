#!/usr/bin/env python
"""Inference speed, memory and perplexity of compressed models against dense: results/benchmarks/inference.json.

One record per (model, form, device, dtype, batch, seqlen) in the list `runs`: ms_prefill (one forward of
batch x seqlen tokens), ms_decode_token (one step of batch new tokens after a seqlen-token context, KV
cache), weight_bytes (parameters and buffers the model holds), peak_bytes (peak GPU memory since the form
was built, its construction included: the synthetic forms are converted from a dense model on the GPU, so
theirs include it; on the CPU the process's peak RSS), ppl (the form on the evaluation text when the weights are real; null
for the random 8B-shaped model, where speed does not depend on the values).

Two sources:
  --model-dir DIR [--compressed DIR ...]   real models: the prepared dense model and compressed models
                                          (glrs.load) on --device, with their perplexity on --text
  --synthetic llama3-8b                   a randomly initialised Llama-3-8B-shaped model built on the GPU,
                                          converted form by form:
      dense      the model as it is
      lrs-0.5    unstructured low rank + sparse at density 0.5 (rank_ratio 0.1, random support), held
                 compactly (values + bitmask) and expanded per product (glrs.compressed.LowRankSparseLinear)
      2:4        the 2:4 sparse part alone (density 0.5), as a semi-structured tensor (cuSPARSELt)
      2:4+lr-0.6 2:4 plus a low rank of 0.1 m n / (m + n) (density 0.6): the semi-structured CAP's shape

On CUDA every timing is of a CUDA graph (captured once, replayed) unless --eager: graphs remove the
per-kernel launch cost that otherwise dominates small products and the semi-structured calls' fixed cost.
Timings are the median of --repeat replays after --warmup.

    python benchmarks/inference.py --synthetic llama3-8b --device cuda --dtype bfloat16 --shapes 1x2048 8x512 1x16384
    python benchmarks/inference.py --model-dir results/model/<key> --compressed results/compressed/<key> --device cpu
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glrs import cas, compressed, data, evaluate, modelio  # noqa: E402

OUT = Path("results/benchmarks/inference.json")
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=500000.0)
SYNTHETIC_FORMS = ("dense", "lrs-0.5", "2:4", "2:4+lr-0.6")


# ---- timing ----------------------------------------------------------------------------------------

def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeat: int, graphs: bool) -> tuple[float, bool]:
    """(median milliseconds of fn(), whether a CUDA graph ran it)."""
    use_graph = graphs and str(device).startswith("cuda")
    if use_graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(max(warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        except Exception as e:  # noqa: BLE001 -- recorded in the run, never hidden
            print(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly", flush=True)
            use_graph, run = False, fn
    else:
        run = fn
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), use_graph


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():  # semi-structured tensors are held outside parameters
        ss = getattr(m, "semi_structured", None)
        if ss is not None:
            total += ss.packed.numel() * ss.packed.element_size()
            if getattr(ss, "meta", None) is not None:
                total += ss.meta.numel() * ss.meta.element_size()
    return total


@torch.no_grad()
def measure(model, batch: int, seqlen: int, device, args) -> dict:
    from transformers import StaticCache

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=g).to(device)
    ms_prefill, g1 = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device,
                           args.warmup, args.repeat, not args.eager)
    ms_decode, g2 = None, False
    if not args.no_decode:
        # Room for every timed step: eagerly each call appends a token (transformers places it after the
        # cache's length); a graph replays the captured position.
        cache = StaticCache(config=model.config, max_cache_len=seqlen + 2 * (args.warmup + args.repeat) + 8)
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(seqlen, device=device), use_cache=True,
              logits_to_keep=1)
        tok = ids[:, -1:].clone()
        pos = torch.tensor([seqlen], device=device)
        ms_decode, g2 = timed(lambda: model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True,
                                            logits_to_keep=1), device, args.warmup, args.repeat, not args.eager)
    return {"ms_prefill": round(ms_prefill, 3), "ms_decode_token": None if ms_decode is None else round(ms_decode, 3),
            "cuda_graphs": {"prefill": g1, "decode": g2}}


def peak_bytes(device) -> int:
    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def device_name(device) -> str:
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


# ---- the synthetic 8B-shaped forms ---------------------------------------------------------------

def _random_lrs(W: torch.Tensor, density: float, rank_ratio: float, two_four: bool, g: torch.Generator):
    """A LowRankSparseLinear of W's shape at `density`: rank from rank_ratio (of the budget, or of the
    budget above the 2:4 half), the rest random sparse entries (or a 2:4 pattern)."""
    m, n = W.shape
    budget = int(density * m * n)
    dev, dt = W.device, W.dtype
    if two_four:
        r = (budget - m * n // 2) // (m + n)
        scores = torch.rand(m, n // 4, 4, device=dev, generator=g)
        idx = scores.topk(2, dim=-1).indices
        mask = torch.zeros(m, n // 4, 4, dtype=torch.bool, device=dev).scatter_(-1, idx, True).view(m, n)
    else:
        r = int(rank_ratio * budget / (m + n))
        k = budget - r * (m + n)
        mask = torch.rand(m, n, device=dev, generator=g) < (k / (m * n))
    values = W[mask]
    U = torch.randn(m, r, device=dev, dtype=dt, generator=g) * 0.01
    V = torch.randn(n, r, device=dev, dtype=dt, generator=g) * 0.01
    mod = compressed.LowRankSparseLinear((m, n), U, V, values, bitmask=compressed.pack_bitmask(mask))
    if two_four:
        mod.to_semi_structured()
    return mod


def synthetic_model(form: str, layers: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(LLAMA3_8B | {"num_hidden_layers": layers}))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no float32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    if form == "dense":
        return model
    g = torch.Generator(device=device).manual_seed(0)
    density, two_four = {"lrs-0.5": (0.5, False), "2:4": (0.5, True), "2:4+lr-0.6": (0.6, True)}[form]
    for i in range(layers):
        for short in modelio.TARGETS:
            path = modelio.weight_name(i, short).removesuffix(".weight")
            parent_path, child = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            new = _random_lrs(getattr(parent, child).weight.data, density, 0.1, two_four, g)
            setattr(parent, child, new)
        torch.cuda.empty_cache() if str(device).startswith("cuda") else None
    return model


# ---- main ----------------------------------------------------------------------------------------

def merge(records: list[dict], out: Path) -> None:
    """Add records to the JSON, replacing earlier ones with the same (model, form, device, dtype, batch, seqlen)."""
    keys = ("model", "form", "device", "dtype", "batch", "seqlen")
    old = json.loads(out.read_text())["runs"] if out.is_file() else []
    new_keys = {tuple(r[k] for k in keys) for r in records}
    runs = [r for r in old if tuple(r[k] for k in keys) not in new_keys] + records
    cas.write_json_atomic(out, {"benchmark": "inference", "command": " ".join(sys.argv), "runs": runs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", choices=["llama3-8b"])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the synthetic model")
    ap.add_argument("--forms", nargs="+", default=list(SYNTHETIC_FORMS))
    ap.add_argument("--model-dir")
    ap.add_argument("--compressed", nargs="*", default=[])
    ap.add_argument("--text", default="pydoc")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", nargs="+", default=["1x2048", "8x512"], help="batch x seqlen")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    out = Path(args.out)

    if args.synthetic:
        items = [(f"{args.synthetic}-random ({args.layers} layers)", form, None) for form in args.forms]
    else:
        if not args.model_dir:
            ap.error("give --synthetic or --model-dir")
        items = [(modelio.read_manifest(args.model_dir)["spec"], "dense", args.model_dir)]
        items += [(modelio.read_manifest(args.model_dir)["spec"], _form_of(c), c) for c in args.compressed]

    for model_name, form, path in items:
        gc.collect()
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"{model_name} / {form}: building", flush=True)
        if args.synthetic:
            model = synthetic_model(form, args.layers, args.device, dtype)
        else:
            from glrs.pipeline import load_model

            model = load_model(path, args.dtype, args.device)
        ppl = None
        if path is not None:
            from transformers import AutoTokenizer

            text = data.load_text(args.text, "evaluation")
            ids = data.tokenize(AutoTokenizer.from_pretrained(args.model_dir), text)
            with torch.no_grad():
                ppl = evaluate.perplexity(model, ids, args.eval_seqlen, args.max_tokens, args.device)["ppl"]
            print(f"  ppl {ppl:.4f} on {text.dataset} ({text.fingerprint[:12]})", flush=True)
        records = []
        for batch, seqlen in shapes:
            try:
                rec = measure(model, batch, seqlen, args.device, args)
            except torch.OutOfMemoryError as e:
                rec = {"ms_prefill": None, "ms_decode_token": None, "error": f"out of memory: {str(e)[:160]}"}
            records.append({"model": model_name, "form": form, "device": device_name(args.device), "dtype": args.dtype,
                            "batch": batch, "seqlen": seqlen, **rec, "weight_bytes": weight_bytes(model),
                            "peak_bytes": peak_bytes(args.device), "ppl": ppl,
                            "source": path, "torch": torch.__version__})
            print(f"  {batch}x{seqlen}: {json.dumps({k: records[-1][k] for k in ('ms_prefill', 'ms_decode_token', 'weight_bytes', 'peak_bytes')})}",
                  flush=True)
        merge(records, out)
        del model


def _form_of(path: str) -> str:
    info = json.loads((Path(path) / "info.json").read_text())
    label = info["method"] + (f"-{info['allocator']}" if info.get("allocator") else "")
    pattern = {t.get("pattern") for t in compressed.read_format(path)["targets"].values()}
    return f"{label}-{info['target_density']}" + ("-2:4" if pattern == {"2:4"} else "")


if __name__ == "__main__":
    main()
