"""Real text, split deterministically into three disjoint texts: calibration, validation, evaluation."""
import hashlib

import pytest
import torch

from glrs import data
from glrs.errors import GlrsError


def paragraphs(text: data.Text) -> set[str]:
    return {p.strip() for p in text.text.split("\n\n") if p.strip()}


def assert_three_disjoint_texts(spec: str) -> dict[str, data.Text]:
    texts = {role: data.load_text(spec, role) for role in data.ROLES}
    for a in data.ROLES:
        for b in data.ROLES:
            if a < b:
                shared = paragraphs(texts[a]) & paragraphs(texts[b])
                assert not shared, f"{spec}: {a} and {b} share {len(shared)} paragraphs, e.g. {next(iter(shared))[:80]!r}"
    assert len({t.fingerprint for t in texts.values()}) == 3
    return texts


def test_pydoc_three_texts_are_disjoint_and_cover_every_topic():
    from pydoc_data.topics import topics

    texts = assert_three_disjoint_texts("pydoc")
    assert all(len(t.text) > 50_000 for t in texts.values())
    roles = {name: data.doc_role(name) for name in topics}
    assert set(roles.values()) == set(data.ROLES)
    for name, body in topics.items():  # evaluation topics are whole in the evaluation text
        if roles[name] == "evaluation":
            assert body in texts["evaluation"].text
    # The topics quote each other: the raw validation topics do share paragraphs with evaluation, which the
    # split removes from validation (so the check above is not vacuous).
    raw_validation = {p.strip() for n, b in topics.items() if roles[n] == "validation" for p in b.split("\n\n")}
    assert raw_validation & paragraphs(texts["evaluation"])


def test_calibration_text_is_that_of_the_two_text_split():
    """Splitting the held-out half in two left the calibration text (and so every calibration key) as it was:
    the old rule, written out here, gives the same text."""
    from pydoc_data.topics import topics

    held_out = [n for n in sorted(topics) if int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) % 2 == 0]
    seen = {p.strip() for n in held_out for p in topics[n].split("\n\n")}
    old = []
    for n in sorted(topics):
        if n not in held_out:
            kept = [p for p in topics[n].split("\n\n") if p.strip() not in seen]
            if kept:
                old.append("\n\n".join(kept))
    assert data.load_text("pydoc", "calibration").text == "\n\n".join(old)


def test_file_spec_three_disjoint_texts_and_unknown_spec(tmp_path):
    f = tmp_path / "t.txt"
    # 80 paragraphs, some repeated (as documents quote each other): the split must still share none
    f.write_text("\n\n".join(f"paragraph number {i % 50} of a real text" for i in range(80)))
    assert_three_disjoint_texts(f"file:{f}")
    with pytest.raises(GlrsError, match="unknown dataset"):
        data.load_text("wikitext103", "evaluation")
    with pytest.raises(GlrsError, match="no such file"):
        data.load_text(f"file:{tmp_path / 'missing.txt'}", "evaluation")
    with pytest.raises(GlrsError, match="has no documents for"):
        one = tmp_path / "one.txt"
        one.write_text("a single paragraph")
        for role in data.ROLES:  # one paragraph can fill one text only
            data.load_text(f"file:{one}", role)


def test_fingerprints_name_the_three_texts():
    fp = data.fingerprints("pydoc", "pydoc")
    assert fp == {role: data.load_text("pydoc", role).fingerprint for role in data.ROLES}
    assert data.fingerprints("pydoc", "")["calibration"] is None  # the dense model saw no calibration text
    assert data.fingerprints("wikitext2", "c4") == {"calibration": "c4:calibration", "validation": "wikitext2:validation",
                                                    "evaluation": "wikitext2:evaluation"}


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000).unsqueeze(0)
    a = data.calibration_samples(ids, 4, 64, seed=1)
    assert torch.equal(a, data.calibration_samples(ids, 4, 64, seed=1))
    assert not torch.equal(a, data.calibration_samples(ids, 4, 64, seed=2))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous windows
    with pytest.raises(GlrsError, match="fewer than one window"):
        data.calibration_samples(ids, 4, 2000, seed=1)
