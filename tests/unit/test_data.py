"""Real text, split deterministically into disjoint calibration and evaluation halves."""
import pytest
import torch

from glrs import data
from glrs.errors import GlrsError


def test_pydoc_split_is_disjoint_and_covers_every_topic():
    from pydoc_data.topics import topics

    calib, evaluation = data.load_text("pydoc", "calibration"), data.load_text("pydoc", "evaluation")
    assert len(calib.text) > 100_000 and len(evaluation.text) > 100_000
    for name, body in topics.items():  # evaluation topics are whole in the evaluation half
        if data._is_eval_doc(name):
            assert body in evaluation.text
    # The topics quote each other; no evaluation paragraph may reach calibration.
    eval_paragraphs = {p.strip() for p in evaluation.text.split("\n\n")}
    calib_paragraphs = {p.strip() for p in calib.text.split("\n\n")}
    assert not eval_paragraphs & calib_paragraphs
    assert calib.fingerprint != evaluation.fingerprint


def test_file_spec_and_unknown_spec(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph number {i} of a real text" for i in range(40)))
    a, b = data.load_text(f"file:{f}", "calibration"), data.load_text(f"file:{f}", "evaluation")
    assert not set(a.text.split("\n\n")) & set(b.text.split("\n\n"))
    with pytest.raises(GlrsError, match="unknown dataset"):
        data.load_text("wikitext103", "evaluation")
    with pytest.raises(GlrsError, match="no such file"):
        data.load_text(f"file:{tmp_path / 'missing.txt'}", "evaluation")


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000).unsqueeze(0)
    a = data.calibration_samples(ids, 4, 64, seed=1)
    assert torch.equal(a, data.calibration_samples(ids, 4, 64, seed=1))
    assert not torch.equal(a, data.calibration_samples(ids, 4, 64, seed=2))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous windows
    with pytest.raises(GlrsError, match="fewer than one window"):
        data.calibration_samples(ids, 4, 2000, seed=1)
