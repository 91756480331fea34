"""Corrupt intermediates: a truncated Stage-1, mask or calibration file stops its consumer with a
GlrsError that names the file and says how to fix it (no bare safetensors traceback)."""
from __future__ import annotations

import json
import shutil

import pytest

from glrs import cli, pipeline
from glrs.errors import GlrsError
from glrs.stage1 import read_rpca_layer
from glrs.stage1 import Stage1

RPCA = {"lambda_scale": 1.0, "tol": 1e-4, "max_iter": 20, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}


def truncate(src, dst, keep: float = 0.6):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def stage_files(tiny_prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corrupt")
    files = []
    for layer in range(3):
        files.append(str(tmp / f"layer_{layer}.safetensors"))
        pipeline.decompose_layer(str(tiny_prepared), layer, RPCA, files[-1], device="cpu")
    pipeline.run_allocator(Stage1.from_files(files), "uniform", 0.5, {"rank_fraction": 0.5}, 0, None, None,
                           str(tmp / "a.json"), str(tmp / "a.safetensors"))
    pipeline.calibrate(str(tiny_prepared), {"dataset": "pydoc", "nsamples": 2, "seqlen": 16}, 0, str(tmp / "calib.safetensors"))
    return tmp, files


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.6, 0.999])
def test_truncated_stage1_file(stage_files, tmp_path, keep):
    tmp, files = stage_files
    bad = truncate(files[1], tmp_path / "layer_1.safetensors", keep)
    broken = [files[0], str(bad), files[2]]
    for call in (lambda: read_rpca_layer(bad),
                 lambda: pipeline.run_allocator(Stage1.from_files(broken), "uniform", 0.5, {"rank_fraction": 0.5}, 0, None, None,
                                                str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"))):
        with pytest.raises(GlrsError, match=r"RPCA factors .*layer_1\.safetensors.*rerun its decompose job"):
            call()
    assert not (tmp_path / "a.safetensors").exists()


def test_truncated_stage1_file_stops_materialise(stage_files, tiny_prepared, tmp_path):
    tmp, files = stage_files
    bad = truncate(files[2], tmp_path / "layer_2.safetensors")
    with pytest.raises(GlrsError, match=r"layer_2\.safetensors.*rerun its decompose job"):
        pipeline.materialise(str(tiny_prepared), Stage1.from_files(files[:2] + [str(bad)]), str(tmp / "a.safetensors"), str(tmp / "a.json"),
                             {"method": "cap", "allocator": "uniform"}, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_truncated_mask_file(stage_files, tiny_prepared, tmp_path, capsys):
    tmp, files = stage_files
    bad = truncate(tmp / "a.safetensors", tmp_path / "masks.safetensors")
    shutil.copy(tmp / "a.json", tmp_path / "masks.json")
    code = cli.main(["materialise", "--model-dir", str(tiny_prepared), "--rpca", *files, "--masks", str(bad),
                     "--alloc-json", str(tmp_path / "masks.json"), "--run-info", json.dumps({"method": "cap"}),
                     "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code != 0
    assert "allocation masks" in err and str(bad) in err and "rerun its allocate job" in err, err
    assert not (tmp_path / "c").exists()


def test_truncated_calibration_file(stage_files, tiny_prepared, tmp_path):
    tmp, _ = stage_files
    assert pipeline.load_calibration(tmp / "calib.safetensors").shape == (2, 16)
    bad = truncate(tmp / "calib.safetensors", tmp_path / "calib.safetensors")
    with pytest.raises(GlrsError, match=r"calibration ids .*calib\.safetensors.*rerun its calibrate job"):
        pipeline.load_calibration(bad)
    with pytest.raises(GlrsError, match=r"calib\.safetensors.*rerun its calibrate job"):
        pipeline.compress_baseline(str(tiny_prepared), str(bad), "magnitude", 0.5, {}, 0, {"method": "magnitude"},
                                   str(tmp_path / "c"), device="cpu")
    assert not (tmp_path / "c").exists()


# ---- CAP's default path: activation statistics and realised layers ------------------------------------

@pytest.fixture(scope="module")
def realised_files(stage_files, tiny_prepared):
    """Statistics of every layer and the uniform allocation realised layer by layer (glrs.realise)."""
    from glrs import realise, stats

    tmp, _ = stage_files
    ids = pipeline.load_calibration(tmp / "calib.safetensors")
    stats.collect(str(tiny_prepared), ids, [0, 1, 2], str(tmp / "stats"))
    stats_files = [str(stats.layer_file(tmp / "stats", i)) for i in range(3)]
    files = []
    for i in range(3):
        files.append(str(tmp / f"realised_{i}.safetensors"))
        realise.realise_layer(str(tiny_prepared), stats_files[i], str(tmp / "a.json"), i, {"iterations": 2}, files[-1])
    return tmp, stats_files, files


@pytest.mark.parametrize("keep", [0.0, 0.6, 0.999])
def test_truncated_statistics_file_stops_realise(realised_files, tiny_prepared, tmp_path, keep):
    from glrs import realise

    tmp, stats_files, _ = realised_files
    bad = truncate(stats_files[1], tmp_path / "layer_1.safetensors", keep)
    with pytest.raises(GlrsError, match=r"activation statistics .*layer_1\.safetensors.*rerun the activations job"):
        realise.realise_layer(str(tiny_prepared), str(bad), str(tmp / "a.json"), 1, {"iterations": 2},
                              str(tmp_path / "r.safetensors"))
    assert not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize("keep", [0.0, 0.6, 0.999])
def test_truncated_realised_layer_stops_materialise_realised(realised_files, tiny_prepared, tmp_path, keep):
    tmp, _, files = realised_files
    pipeline.materialise_realised(str(tiny_prepared), files, str(tmp / "a.json"), {"method": "cap"}, str(tmp_path / "ok"))
    bad = truncate(files[2], tmp_path / "realised_2.safetensors", keep)
    with pytest.raises(GlrsError, match=r"cannot read realised layer .*realised_2\.safetensors.*rerun its realise job"):
        pipeline.materialise_realised(str(tiny_prepared), files[:2] + [str(bad)], str(tmp / "a.json"),
                                      {"method": "cap"}, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
