"""Shared fixtures: a tiny randomly initialised Llama (mechanics) and the real embedded model (smoke)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is much faster than two contended ones (LAPACK calls only wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (from the embedded GGUF), saved as a plain HF tokenizer directory."""
    from transformers import AutoTokenizer

    from glrs.modelio import embedded_gguf_path

    gguf = embedded_gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama small enough for a CPU test, with a real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_decomposed(model, model_dir: Path, rpca_params: dict) -> list[str]:
    """Save a Hugging Face Llama as a glrs checkpoint (weights + manifest) and run the real Stage 1
    on each of its layers; returns the per-layer RPCA files (beside model_dir)."""
    from glrs import cas, modelio, pipeline

    model.save_pretrained(model_dir)
    layers = model.config.num_hidden_layers
    manifest = {"spec": str(model_dir), "source_kind": "hf_dir", "source_key": "test", "model_type": "llama",
                "num_layers": layers, "dtype": "float32", "targets": {},
                "fingerprint": modelio.checkpoint_fingerprint(model_dir)}
    cas.write_json_atomic(Path(model_dir) / modelio.MANIFEST, manifest)
    files = []
    for layer in range(layers):
        out = Path(model_dir).parent / f"layer_{layer}.safetensors"
        pipeline.decompose_layer(str(model_dir), layer, rpca_params, str(out), device="cpu")
        files.append(str(out))
    return files


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, real_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), real_tokenizer_dir, layers=3)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama converted to a glrs checkpoint (safetensors + manifest)."""
    from glrs.modelio import prepare_model

    out = tmp_path_factory.mktemp("prepared") / "model"
    prepare_model(str(tiny_llama_dir), out)
    return out


@pytest.fixture(scope="session")
def smollm2_prepared(tmp_path_factory) -> Path:
    """The real embedded SmolLM2-135M-Instruct, dequantised once per test session."""
    from glrs.modelio import EMBEDDED_DEFAULT, prepare_model

    out = tmp_path_factory.mktemp("smollm2") / "model"
    prepare_model(EMBEDDED_DEFAULT, out)
    return out


@pytest.fixture(autouse=True)
def _isolated_hash_cache(tmp_path_factory, monkeypatch):
    """Keep the file-hash cache of tests out of the user's ~/.cache."""
    monkeypatch.setenv("GLRS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "glrs-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def slow_dense(U, sigma, V, S_index, S_values, shape) -> torch.Tensor:
    """W = U diag(sigma) V^T + S, S filled entry by entry: flat index i is row i // n, column i % n (the
    slow obvious composition the exactness tests compare glrs's against)."""
    m, n = shape
    W = U.double() @ torch.diag(sigma.double()) @ V.double().T
    for i, v in zip(S_index.tolist(), S_values.double().tolist()):
        W[i // n, i % n] += v
    return W


def slow_support_positions(t: dict[str, torch.Tensor], m: int, n: int) -> list[tuple[int, int]]:
    """(row, column) of every kept entry, in row-major order, of a support stored as docs/format.md says:
    bit j of byte b of a row is column 8b + j; or row offsets and columns (int16 wraps at 32768)."""
    if "bitmask" in t:
        bits = t["bitmask"].tolist()
        return [(i, 8 * b + j) for i in range(m) for b in range(len(bits[i])) for j in range(8)
                if (bits[i][b] >> j) & 1 and 8 * b + j < n]
    if "cols" in t:
        offsets, cols = t["row_offsets"].tolist(), t["cols"].tolist()
        return [(i, cols[p] & 0xFFFF) for i in range(m) for p in range(offsets[i], offsets[i + 1])]
    return []


def slow_read_compressed(path: Path) -> dict[str, torch.Tensor]:
    """Every target matrix of a compressed model directory, decoded the slow obvious way from the files
    (glrs_format.json + safetensors, docs/format.md): U V^T, plus the values placed one by one at the
    support's positions in row-major order (bit j of byte b of a row is column 8b + j; or row offsets and
    columns); a dense-stored target as it is."""
    from safetensors import safe_open

    header = json.loads((path / "glrs_format.json").read_text())
    out = {}
    for name, rec in header["targets"].items():
        m, n = rec["shape"]
        with safe_open(str(path / rec["file"]), framework="pt") as f:
            if rec["support"] == "dense":
                out[name] = f.get_tensor(name).double()
                continue
            t = {k.removeprefix(name + "."): f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        W = t["U"].double() @ t["V"].double().T
        values = t["values"].double().tolist()
        positions = slow_support_positions(t, m, n)
        assert len(positions) == len(values) == rec["nnz"], name
        for (i, j), v in zip(positions, values):
            W[i, j] += v
        out[name] = W
    return out


TINY_RPCA_PARAMS = {"lambda_scale": 1.0, "tol": 1e-7, "max_iter": 500, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}


def tiny_decomposed(root: Path) -> dict:
    """A 2-layer random Llama (vocabulary 96) saved under root/model and decomposed by the real Stage 1:
    model_dir, files, pools and 6 x 24 seeded calibration ids (CAP's unit tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from glrs import allocate
    from glrs.stage1 import Stage1

    model_dir = root / "model"
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    files = save_decomposed(LlamaForCausalLM(cfg), model_dir, TINY_RPCA_PARAMS)
    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))
    return {"model_dir": str(model_dir), "files": files, "stage1": Stage1.from_files(files),
            "pools": allocate.load_pools(files), "ids": ids}
