"""benchmarks/choose_on_validation.py end to end on a tiny random Llama: it runs the pipeline once per
candidate, chooses on the validation perplexities alone, and computes no evaluation perplexity to do so."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from glrs import data

pytestmark = pytest.mark.pipeline


def test_choose_offset_scale_on_validation_only(tmp_path, tiny_llama_dir):
    cfg = {"model": str(tiny_llama_dir), "device": "cpu", "layers": [0, 1], "methods": ["cap"], "allocators": ["cap"],
           "target_density": [0.5], "calibration": {"dataset": "pydoc", "nsamples": 4, "seqlen": 64},
           "evaluation": {"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 1024, "zeroshot": {"tasks": []}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "choice.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "choose_on_validation.py"), "--config",
                           str(tmp_path / "tiny.yaml"), "--values", "0.25", "1.0", "--directory", str(tmp_path / "w"),
                           "--cores", "2", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    choice = json.loads(out.read_text())
    assert [c["value"] for c in choice["candidates"]] == [0.25, 1.0]
    ppl = {}
    for c in choice["candidates"]:
        ((label, path),) = c["metrics_files"].items()
        rec = json.loads((tmp_path / "w" / path).read_text())
        assert rec["role"] == "validation" and rec["ppl"] == c["validation_ppl"][label] == c["criterion"]
        ppl[c["value"]] = rec["ppl"]
        # no evaluation perplexity of the candidates was computed: nothing but validation was there to read
        assert [p.name for p in (tmp_path / "w" / path).parent.glob("ppl-*.json")] == [(tmp_path / "w" / path).name]
    assert ppl[0.25] != ppl[1.0] and choice["pick"] == min(ppl, key=ppl.get)
    assert choice["texts"] == data.fingerprints("pydoc", "pydoc")
    assert "<- pick" in proc.stdout and "run time:" in proc.stdout and "evaluation perplexity of the pick" not in proc.stdout
