"""benchmarks/choose_on_validation.py without Snakemake: the config it hands over, what it refuses to read,
and the knobs it refuses before any job runs (the end-to-end run: tests/pipeline/test_choose_on_validation.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from glrs.errors import GlrsError


@pytest.fixture(scope="module")
def choose():
    spec = importlib.util.spec_from_file_location("choose_on_validation", REPO / "benchmarks" / "choose_on_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(tmp_path, model, **over) -> str:
    cfg = {"model": str(model), "device": "cpu", "methods": ["cap"], "allocators": ["cap"], "target_density": [0.5],
           "evaluation": {"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 1024, "zeroshot": {"tasks": []}}} | over
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_candidate_config_is_the_users_with_the_knob_and_validation(choose, tmp_path, tiny_llama_dir):
    cfg = choose.merged_config(None, choose.overlay_of("allocator_params.cap.offset_scale", 0.25))
    assert cfg["allocator_params"]["cap"] == {"epochs": 1, "offset_scale": 0.25}  # merged into the default's section
    assert cfg["evaluation"]["validation"] is True and cfg["evaluation"]["datasets"] == ["pydoc"]
    user = Path(_config(tmp_path, tiny_llama_dir))
    cfg = choose.merged_config(user, choose.overlay_of("realise.rank_ratio", 0.2))
    assert cfg["model"] == str(tiny_llama_dir) and cfg["realise"]["rank_ratio"] == 0.2 and cfg["realise"]["mode"] == "refit"


def test_an_evaluation_record_is_never_read_to_choose(choose, tmp_path):
    path = tmp_path / "ppl.json"
    path.write_text(json.dumps({"role": "evaluation", "ppl": 10.0}))
    with pytest.raises(GlrsError, match="not a validation perplexity"):
        choose.read_validation(path)
    path.write_text(json.dumps({"ppl": 10.0}))  # a record from before validation existed: evaluation
    with pytest.raises(GlrsError, match="not a validation perplexity"):
        choose.read_validation(path)


def test_knobs_that_change_nothing_or_the_grid_stop_before_any_job(choose, tmp_path, tiny_llama_dir, capsys):
    uniform = _config(tmp_path, tiny_llama_dir, allocators=["uniform"])
    argv = ["--config", uniform, "--values", "0.25", "0.5", "--directory", str(tmp_path / "w"), "--out", str(tmp_path / "o.json")]
    assert choose.main(argv) == 2
    assert "changes no compressed model" in capsys.readouterr().err
    grid = _config(tmp_path, tiny_llama_dir)
    assert choose.main(["--config", grid, "--knob", "target_density", "--values", "[0.4]", "[0.5]",
                        "--directory", str(tmp_path / "w")]) == 2
    assert "plan different runs" in capsys.readouterr().err
    assert choose.main(["--config", grid, "--values", "0.5", "0.5"]) == 2
    assert "two different candidates" in capsys.readouterr().err
    assert not (tmp_path / "w" / "results" / "metrics").exists() and not (tmp_path / "o.json").exists()
