"""glrs.stage1: under stage1 weights the consumers split the weights in memory instead of reading a
decompose file, and get the same candidates, bit for bit; so an allocation and a compressed model made
without Stage-1 files have the bytes of one made from them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glrs import allocate, cas, pipeline
from glrs.cap import candidates as cap_candidates
from glrs.errors import GlrsError
from glrs.stage1 import PARTS, Stage1
from glrs.stage1 import Stage1

NONE = {"method": "none", "lambda_scale": 1.0, "tol": 1e-7, "max_iter": 500, "rho": 1.5, "mu_factor": 1.25,
        "dtype": "float64"}
RPCA_KEY = "0123456789ab"
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def both(tiny_prepared, tmp_path_factory):
    """The tiny Llama's Stage 1 under stage1 weights twice: the decompose jobs' files (as the pipeline
    lays them out: rpca/<model_key>/<stage1_key>/layer_<i>.safetensors) and the in-memory split."""
    root = tmp_path_factory.mktemp("stage1")
    model_key = Path(tiny_prepared).name
    files = []
    for layer in LAYERS:
        out = root / "rpca" / model_key / RPCA_KEY / f"layer_{layer}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        pipeline.decompose_layer(str(tiny_prepared), layer, NONE, str(out), device="cpu")
        files.append(str(out))
    return Stage1.from_files(files), Stage1.from_weights(tiny_prepared, LAYERS, RPCA_KEY), root


def _without_source(alloc_json: Path) -> bytes:
    """An allocation's canonical bytes without the one field that names where Stage 1 was read from."""
    info = json.loads(alloc_json.read_text())
    assert info["inputs"].pop("stage1") in ("files", "weights")
    return cas.canonical_json(info).encode()


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_split_equals_the_decompose_file_of_the_same_layer(both):
    from_files, from_weights, _ = both
    assert not from_files.splits_weights and from_weights.splits_weights
    assert {**from_files.keys(), "stage1": "weights"} == from_weights.keys() and from_files.keys()["stage1"] == "files"
    for layer in LAYERS:
        meta_f, t_f = from_files.layer(layer)
        meta_w, t_w = from_weights.layer(layer)
        assert meta_w["layer"] == meta_f["layer"] == layer
        assert list(meta_w["matrices"]) == list(meta_f["matrices"])  # the order the consumers walk them in
        for short, m in meta_f["matrices"].items():
            assert meta_w["matrices"][short] == {"name": m["name"], "shape": m["shape"]}
            for part in PARTS:
                assert _equal(t_w[f"{short}.{part}"], t_f[f"{short}.{part}"]), (layer, short, part)
            assert t_w[f"{short}.sigma"].numel() == 0  # L = 0
        assert set(t_w) == set(t_f)


def test_pools_and_cap_factors_from_the_weights_equal_those_from_the_files(both):
    from_files, from_weights, _ = both
    pf, pw = allocate.load_pools(from_files.files), from_weights.pools()
    assert [(p.name, p.layer, p.short, p.shape) for p in pw] == [(p.name, p.layer, p.short, p.shape) for p in pf]
    for a, b in zip(pw, pf):
        assert _equal(a.sigma, b.sigma) and _equal(a.s_abs, b.s_abs)
    for space in cap_candidates.SPACES:
        fw = cap_candidates._read_factors(from_weights, pw, space, torch.device("cpu"), offload=False)
        ff = cap_candidates._read_factors(from_files, pf, space, torch.device("cpu"), offload=False)
        assert list(fw) == list(ff)
        for name in ff:
            assert list(fw[name]) == list(ff[name])
            assert all(_equal(fw[name][k], ff[name][k]) for k in ff[name]), (space, name)


@pytest.mark.parametrize("allocator", ["uniform", "rpca-threshold"])
def test_allocation_and_selected_model_are_byte_identical_without_the_files(both, tiny_prepared, tmp_path, allocator):
    """realise.mode select under stage1 weights: allocate, then materialise the kept candidates of S = W."""
    from_files, from_weights, _ = both
    out = {}
    for name, source in (("files", from_files), ("weights", from_weights)):
        d = tmp_path / name
        d.mkdir()
        pipeline.run_allocator(source, allocator, 0.5, {"rank_fraction": 0.5}, 0, str(tiny_prepared), None,
                               str(d / "a.json"), str(d / "a.safetensors"))
        pipeline.materialise(str(tiny_prepared), source, str(d / "a.safetensors"), str(d / "a.json"),
                             {"method": "cap", "allocator": allocator}, str(d / "c"))
        out[name] = {str(p.relative_to(d)): cas.sha256_file(p) for p in sorted(d.rglob("*"))
                     if p.is_file() and p.name != "a.json"} | {"a.json": _without_source(d / "a.json")}
    assert out["weights"] == out["files"]
    info = json.loads((tmp_path / "weights" / "a.json").read_text())
    assert info["inputs"] == {"model_key": Path(tiny_prepared).name, "stage1_key": RPCA_KEY, "layers": LAYERS,
                              "stage1": "weights"}
    assert json.loads((tmp_path / "files" / "a.json").read_text())["inputs"]["stage1"] == "files"
    assert abs(info["achieved_density"] - 0.5) < 1e-3
    assert all(m["rank_available"] == 0 for m in info["matrices"].values())


def test_cap_allocation_is_byte_identical_without_the_files(both, tiny_prepared, tmp_path):
    """CAP's tied policy composes W~ from the factors (glrs.cap.candidates._read_factors) for its steps."""
    from_files, from_weights, _ = both
    calib = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))}, str(calib))
    params = {"policy": "tied", "epochs": 1, "batch_size": 2, "init": "magnitude"}
    got = {}
    for name, source in (("files", from_files), ("weights", from_weights)):
        d = tmp_path / name
        info = pipeline.run_allocator(source, "cap", 0.5, params, 0, str(tiny_prepared), str(calib),
                                      str(d / "a.json"), str(d / "a.safetensors"), device="cpu")
        assert info["stage2"]["steps"] == 2
        got[name] = (_without_source(d / "a.json"), (d / "a.safetensors").read_bytes())
    assert got["weights"] == got["files"]


def test_cli_splits_the_weights_and_names_what_is_missing(both, tiny_prepared, tmp_path):
    def glrs(*args):
        return subprocess.run([sys.executable, "-m", "glrs", *args], capture_output=True, text=True)

    proc = glrs("allocate", "--split-layers", "0", "1", "2", "--allocator", "uniform", "--density", "0.5",
                "--model-dir", str(tiny_prepared), "--json-out", str(tmp_path / "a.json"),
                "--masks-out", str(tmp_path / "a.safetensors"))
    assert proc.returncode == 2 and "--stage1-key" in proc.stderr
    proc = glrs("materialise", "--split-layers", "0", "--masks", "x", "--alloc-json", "y", "--out", "z")
    assert proc.returncode != 0 and "--model-dir" in proc.stderr
    proc = glrs("plot-spectra", "--model-dir", str(tiny_prepared), "--split-layers", "0", "2",
                "--out", str(tmp_path / "spectra.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(GlrsError, match="prepare-model"):
        Stage1.from_weights(tmp_path / "nope", [0], RPCA_KEY).check_readable()
    with pytest.raises(GlrsError, match="no Stage-1 files"):
        Stage1.from_files([])


def test_budget_only_pools_count_the_candidates_without_reading_a_weight(both, monkeypatch):
    """pools(values=False) under stage1 weights: the same names, shapes and counts as the full pools, from the
    checkpoint's headers (no weight read, no sort; ~56 GB of float64 at 8B), and no value to misuse."""
    from glrs import modelio

    _, from_weights, _ = both
    full = from_weights.pools()
    monkeypatch.setattr(modelio, "read_layer", lambda *a, **k: pytest.fail("read a weight"))
    light = from_weights.pools(values=False)
    assert [(p.name, p.layer, p.short, p.shape, p.sigma.numel(), p.s_abs.numel()) for p in light] == \
        [(p.name, p.layer, p.short, p.shape, p.sigma.numel(), p.s_abs.numel()) for p in full]
    assert all(p.s_abs.is_meta for p in light)
    assert pipeline._budgets_only("uniform", {}) and pipeline._budgets_only("cap", {})
    assert not pipeline._budgets_only("rpca-threshold", {}) and not pipeline._budgets_only("cap", {"policy": "entry"})
