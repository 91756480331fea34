#!/usr/bin/env python
"""Where 2:4 time goes on one linear layer: dense against PyTorch's semi-structured paths, under CUDA graphs.
results/benchmarks/semi_structured_probe.json. Llama-3-8B shapes (out x in), bf16, tokens T:

  dense        F.linear(x, W)
  semi         F.linear(x, W24) with W24 = to_sparse_semi_structured(W)   (what glrs's 2:4 module runs)
  semi-fused   the same with SparseSemiStructuredTensor._FUSE_TRANSPOSE (cuSPARSELt writes x W^T row-major)
  cslt         torch._cslt_sparse_mm(W24.packed, x.T) -> [out, T] (no transpose of the result)
  lowrank      (x V) U^T with r = 0.1 out in / (out + in) (the low rank of 2:4 + low rank at density 0.6)

    python benchmarks/semi_structured_probe.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
TOKENS = [1, 32, 2048, 16384]


def graph_ms(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/benchmarks/semi_structured_probe.json")
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n in SHAPES:
        W = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
        idx = torch.rand(m, n // 4, 4, device="cuda", generator=g).topk(2, -1).indices
        mask = torch.zeros(m, n // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, idx, True).view(m, n)
        W = W * mask
        SparseSemiStructuredTensor._FUSE_TRANSPOSE = False
        W24 = to_sparse_semi_structured(W)
        SparseSemiStructuredTensor._FUSE_TRANSPOSE = True
        W24f = to_sparse_semi_structured(W)
        r = int(0.1 * m * n / (m + n))
        U = torch.randn(m, r, device="cuda", dtype=torch.bfloat16) * 0.01
        V = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.01
        for T in TOKENS:
            x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            row = {"shape": [m, n], "tokens": T}
            cases = {"dense": lambda: F.linear(x, W), "semi": lambda: F.linear(x, W24),
                     "semi-fused": lambda: F.linear(x, W24f),
                     "cslt": lambda: torch._cslt_sparse_mm(W24.packed, x.T),
                     "lowrank": lambda: (x @ V) @ U.T}
            for name, fn in cases.items():
                try:
                    row[name] = round(graph_ms(fn), 4)
                except Exception as e:  # noqa: BLE001 -- recorded
                    row[name] = f"{type(e).__name__}: {str(e)[:100]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
