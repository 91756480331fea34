"""Offline zero-shot tasks (real text, deterministic, disjoint from calibration) and lm-eval end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glrs import data, zeroshot
from glrs.errors import GlrsError


def _norm(s: str) -> str:
    return " ".join(s.split())


def _rows(task_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    fp = zeroshot.build_offline_tasks(d, "pydoc", n=zeroshot.DEFAULT_N)
    return d, fp


@pytest.fixture(scope="module")
def texts():
    return _norm(data.load_text("pydoc", "evaluation").text), _norm(data.load_text("pydoc", "calibration").text)


def test_task_sets():
    assert zeroshot.PAPER_TASKS == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert set(zeroshot.OFFLINE_TASKS) == {"glrs_lastword", "glrs_nextsent", "glrs_cloze"}


def test_deterministic_and_location_independent(built, tmp_path):
    d, fp = built
    assert zeroshot.build_offline_tasks(tmp_path / "again", "pydoc", n=zeroshot.DEFAULT_N) == fp
    for t in zeroshot.OFFLINE_TASKS:
        assert (tmp_path / "again" / f"{t}.jsonl").read_bytes() == (d / f"{t}.jsonl").read_bytes()
    manifest = json.loads((d / "glrs_tasks.json").read_text())
    assert manifest["fingerprint"] == fp
    # a different size is a different task set
    assert zeroshot.build_offline_tasks(tmp_path / "small", "pydoc", n=50) != fp


def test_sizes(built):
    d, _ = built
    for t in zeroshot.OFFLINE_TASKS:
        rows = _rows(d, t)
        assert 200 <= len(rows) <= zeroshot.DEFAULT_N, (t, len(rows))
        assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)


def test_gold_answers_are_real_text(built, texts):
    d, _ = built
    source, _ = texts
    for r in _rows(d, "glrs_lastword"):
        assert r["target"].isalpha()
        assert _norm(r["context"] + " " + r["target"] + ".") in source
        # LAMBADA-like: the word to predict already occurs in the passage
        assert r["target"].lower() in r["context"].lower()
    for r in _rows(d, "glrs_nextsent"):
        assert _norm(r["context"] + " " + r["choices"][r["label"]]) in source
        wrong = r["choices"][1 - r["label"]]
        assert _norm(wrong) in source  # a real sentence, from another document
        assert _norm(r["context"] + " " + wrong) not in source
    for r in _rows(d, "glrs_cloze"):
        assert r["choices"][r["label"]].startswith(r["answer"])
        assert _norm(r["context"] + " " + r["choices"][r["label"]]) in source
        for i, c in enumerate(r["choices"]):
            word = c.split()[0]
            assert re.search(rf"\b{word}\b", source)  # distractors are words of the same text
            if i != r["label"]:
                assert _norm(r["context"] + " " + c) not in source


def test_choices_differ(built):
    d, _ = built
    labels = {"glrs_nextsent": [], "glrs_cloze": []}
    for t, k in (("glrs_nextsent", 2), ("glrs_cloze", 4)):
        for r in _rows(d, t):
            assert len(r["choices"]) == k and len(set(r["choices"])) == k
            assert 0 <= r["label"] < k
            labels[t].append(r["label"])
    # the gold position is randomised, not always first
    for t, ls in labels.items():
        counts = [ls.count(i) for i in set(ls)]
        assert len(counts) == (2 if t == "glrs_nextsent" else 4) and min(counts) > 0.15 * len(ls)


def test_no_overlap_with_calibration(built, texts):
    d, _ = built
    _, calib = texts
    for r in _rows(d, "glrs_lastword"):
        assert _norm(r["context"] + " " + r["target"])[-200:] not in calib
    for r in _rows(d, "glrs_nextsent"):
        assert _norm(r["context"]) not in calib
        assert all(_norm(c) not in calib for c in r["choices"])
    for r in _rows(d, "glrs_cloze"):
        assert _norm(r["context"] + " " + r["choices"][r["label"]]) not in calib


def test_yaml_is_loadable_by_lm_eval(built):
    from lm_eval.tasks import TaskManager

    d, _ = built
    manager = TaskManager(include_path=str(d), include_defaults=False)
    assert set(zeroshot.OFFLINE_TASKS) <= set(manager.all_tasks)


def test_paper_tasks_need_the_hub(monkeypatch):
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(GlrsError, match="glrs_lastword"):
        zeroshot.evaluate_model(None, None, ["boolq"])


@pytest.fixture(scope="module")
def zs_tiny_llama(tmp_path_factory):
    """A random 2-layer Llama, hidden size 32, with SmolLM2's real tokenizer (from the embedded GGUF)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from glrs.modelio import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert len(tok) == 49152
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("zs-tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_run_zeroshot_end_to_end(zs_tiny_llama, built, tmp_path):
    out = tmp_path / "zs.json"
    rec = zeroshot.run_zeroshot(str(zs_tiny_llama), list(zeroshot.OFFLINE_TASKS), str(out), "cpu", 5, 0, batch_size=8)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(rec))
    assert written["tasks"] == list(zeroshot.OFFLINE_TASKS) and written["task_set"] == "offline"
    assert written["lm_eval_version"].startswith("0.4")
    assert len(written["offline_tasks"]["fingerprint"]) == 64
    for t in zeroshot.OFFLINE_TASKS:
        res = written["results"][t]
        assert 0.0 <= res["acc"] <= 1.0 and res["examples"] == 5 and res["examples_total"] >= 200
        assert res["acc_stderr"] >= 0
        if t != "glrs_lastword":
            assert 0.0 <= res["acc_norm"] <= 1.0
    # deterministic on the CPU: a second run, on tasks built beforehand, gives the same tasks and numbers
    again = zeroshot.run_zeroshot(str(zs_tiny_llama), list(zeroshot.OFFLINE_TASKS), str(tmp_path / "b.json"), "cpu", 5, 0,
                                  batch_size=8, task_dir=str(built[0]))
    assert again["offline_tasks"]["fingerprint"] == written["offline_tasks"]["fingerprint"] == built[1]
    assert again["results"] == written["results"]
