"""Exactness of CAP's default output path -- realise, then materialise_realised -- where the answer is known.

The model's every target matrix is planted as W = (rank 2) + (2 entries per row), and the allocation
gives each matrix exactly that budget (rank_ratio 0.8 splits every shape of the tiny Llama into rank 2
and 2 entries a row). GoDec in the activation-scaled space W D = L D + S D then has an exact answer,
and the refit keeps it (the residual is already zero on the support). So, with no reference to the
code under test:
  * each realised layer file composes, the slow obvious way, to the planted W (square and non-square,
    rank 2 and 3m sparse entries, each checked non-empty);
  * the materialised compact checkpoint (decoded the slow way) and the dense export hold the realised
    file's matrices;
  * the loaded compressed model, the dense export and the original model give the same logits on random ids.
Each of these faults was planted in a scratch copy and fails a test here: sparse values rolled by one
(in realise_matrix, in realise_layer's writer, in read_realised, in compose, in LowRankSparseLinear, in
glrs.load), sparse indices transposed (realise_matrix's flat index, compose, LowRankSparseLinear),
the low-rank part dropped (realise_matrix, materialise_realised, compose, the module's forward), U and V
exchanged (realise_matrix, read_realised, compose, the module), the refit returning zeros, the rank
dropped to 0 and GoDec's low-rank step ignoring the sparse part.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glrs import cas, compressed, modelio, pipeline, realise, stats

from conftest import slow_dense, slow_read_compressed, slow_support_positions

transformers = pytest.importorskip("transformers")

RANK, PER_ROW = 2, 2
PARAMS = {"rank_ratio": 0.8, "iterations": 40}  # every tiny-Llama shape: budget 2(m+n) + 2m -> rank 2, 2m entries
PARTS = ("U", "sigma", "V", "S_index", "S_values")

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_weight(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A rank-2 part plus 2 entries in every row, at random columns, of magnitudes in [0.5, 1] (planted so that
    GoDec recovers both: with 3 a row, or entries 20x the low-rank part, it does not reach W)."""
    L = 0.5 * torch.randn(m, RANK, generator=g, dtype=torch.float64) @ torch.randn(RANK, n, generator=g, dtype=torch.float64)
    S = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        cols = torch.randperm(n, generator=g)[:PER_ROW]
        sign = torch.where(torch.rand(PER_ROW, generator=g) < 0.5, -1.0, 1.0).double()
        S[i, cols] = sign * 0.5 * (1 + torch.rand(PER_ROW, generator=g, dtype=torch.float64))
    return (L + S).float()


@pytest.fixture(scope="module")
def realised(tiny_llama_dir, tmp_path_factory):
    """The planted model prepared, its activation statistics, every layer realised at the planted
    budgets, and the compressed model materialised from the realised files."""
    tmp = tmp_path_factory.mktemp("realise_exact")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            for short in modelio.TARGETS:
                mod = model.get_submodule(modelio.weight_name(layer, short).removesuffix(".weight"))
                mod.weight.copy_(planted_weight(*mod.weight.shape, g))
    model.save_pretrained(tmp / "hf")
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp / "hf")
    model_dir = tmp / "model"
    modelio.prepare_model(str(tmp / "hf"), model_dir)
    layers = list(range(model.config.num_hidden_layers))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
    stats.collect(str(model_dir), ids, layers, str(tmp / "stats"))

    weights = {modelio.weight_name(i, s): W for i in layers for s, W in modelio.read_layer(model_dir, i).items()}
    matrices = {name: {"shape": list(W.shape), "rank": RANK, "nnz": PER_ROW * W.shape[0]} for name, W in weights.items()}
    dense = sum(W.numel() for W in weights.values())
    kept = sum(RANK * sum(m["shape"]) + m["nnz"] for m in matrices.values())
    alloc = tmp / "alloc.json"
    cas.write_json_atomic(alloc, {"matrices": matrices, "target_density": kept / dense, "achieved_density": kept / dense,
                                  "params_dense": dense})
    files = []
    for i in layers:
        out = tmp / f"realised_{i}.safetensors"
        realise.realise_layer(str(model_dir), str(stats.layer_file(tmp / "stats", i)), str(alloc), i, PARAMS, str(out))
        files.append(str(out))
    out = tmp / "compressed"
    pipeline.materialise_realised(str(model_dir), files, str(alloc), {"method": "cap", "allocator": "test"}, str(out),
                                  export="dense")
    return {"model_dir": model_dir, "files": files, "weights": weights, "out": out, "kept": kept, "dense": dense}


def _raw_realised(files) -> dict[str, tuple[dict, tuple]]:
    """name -> (the file's record, its parts), read straight from the safetensors files."""
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            for short, rec in meta["matrices"].items():
                t = {k.removeprefix(short + "."): f.get_tensor(k) for k in f.keys() if k.startswith(short + ".")}
                m, n = rec["shape"]
                index = torch.tensor([i * n + j for i, j in slow_support_positions(t, m, n)], dtype=torch.int64)
                out[rec["name"]] = (rec, tuple(index if p == "S_index" else t[p] for p in PARTS))
    return out


def test_realised_files_compose_to_the_planted_weights(realised):
    raw = _raw_realised(realised["files"])
    assert set(raw) == set(realised["weights"])
    shapes = {tuple(rec["shape"]) for rec, _ in raw.values()}
    assert shapes >= {(32, 32), (16, 32), (64, 32), (32, 64)}  # square and non-square
    for name, (rec, parts) in raw.items():
        W = realised["weights"][name].double()
        m, n = W.shape
        U, sigma, V, S_index, S_values = parts
        assert U.shape == (m, RANK) and V.shape == (n, RANK) and S_values.numel() == S_index.numel() == PER_ROW * m
        assert float(sigma.min()) > 0.1 and float(S_values.abs().min()) > 0.4  # both parts really there
        assert rec["rank"] == RANK and rec["params"] == RANK * (m + n) + PER_ROW * m
        got = slow_dense(*parts, shape=(m, n))
        torch.testing.assert_close(got, W, rtol=0, atol=1e-4 * float(W.abs().max()), msg=name)
        assert rec["error"] < 1e-8, (name, rec["error"])


def test_materialised_realisation_holds_the_realised_matrices(realised):
    """Compact checkpoint and dense export: the realised files' matrices, everything else the model's."""
    raw = _raw_realised(realised["files"])
    out = realised["out"]
    info = json.loads((out / "info.json").read_text())
    assert info["params_kept"] == realised["kept"]
    factored = slow_read_compressed(out)
    assert set(factored) == set(raw)
    dense = {}
    for shard in (out / compressed.DENSE_DIR).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            dense |= {k: f.get_tensor(k) for k in f.keys()}
    for name, (rec, parts) in raw.items():
        want = slow_dense(*parts, shape=tuple(rec["shape"]))
        scale = float(want.abs().max())
        torch.testing.assert_close(factored[name], want, rtol=0, atol=1e-6 * scale, msg=name)  # float32 storage
        torch.testing.assert_close(dense[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)  # float32 storage
    with safe_open(str(next(realised["model_dir"].glob("*.safetensors"))), framework="pt") as f:
        for name in f.keys():
            if name not in raw:
                assert torch.equal(dense[name], f.get_tensor(name)), name


def test_factored_dense_export_and_original_model_agree(realised):
    """The planted model is its own compression: the factored modules, the dense export and the model
    itself give the same logits on random ids (and the factored module the same outputs as x W^T)."""
    g = torch.Generator().manual_seed(12)
    original = transformers.AutoModelForCausalLM.from_pretrained(realised["model_dir"]).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(realised["out"] / compressed.DENSE_DIR).eval()
    factored = compressed.load(realised["out"])
    swapped = [n for n, mod in factored.named_modules() if isinstance(mod, compressed.LowRankSparseLinear)]
    assert len(swapped) == len(realised["weights"])
    ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        want = original(ids).logits
        scale = float(want.abs().max())
        torch.testing.assert_close(exported(ids).logits, want, rtol=0, atol=1e-3 * scale)
        torch.testing.assert_close(factored(ids).logits, want, rtol=0, atol=1e-3 * scale)
        for name in swapped:
            mod = factored.get_submodule(name)
            x = torch.randn(3, mod.in_features, generator=g)
            W = realised["weights"][name + ".weight"]
            torch.testing.assert_close(mod(x), x @ W.T, rtol=0, atol=1e-4 * float((x @ W.T).abs().max()))
