"""Calibration and evaluation text, offline and online, never random tokens.

A dataset spec names where text comes from:
  pydoc        CPython's pydoc_data.topics (ships with every Python; PSF licence)
  python-docs  Debian's python3.X-doc reST sources (apt install python3.11-doc)
  file:PATH    any local UTF-8 text file (split into paragraphs)
  wikitext2    wikitext-2-raw-v1 through `datasets` (needs the hub)
  c4           allenai/c4, first English shard, through `datasets` (needs the hub)

Three disjoint texts per source (docs/design.md section 8):
  calibration  what compression learns from
  validation   what any setting chosen from a measurement is chosen on
               (benchmarks/choose_on_validation.py)
  evaluation   what is reported, never used to choose anything

Offline sources are lists of documents split deterministically by a hash of
each document's name into a calibration half and a held-out half, and the
held-out half again, by other bits of the same hash, into validation and
evaluation. Documents of these sources quote each other (pydoc's "compound"
topic contains the whole "if" topic, and a third of the paragraphs recur across
topics), so calibration drops every paragraph that occurs in the held-out half,
and validation every paragraph that occurs in evaluation: no two texts share a
paragraph. Online sources use the datasets' own splits (wikitext2: train /
validation / test; c4: a train shard / two different validation shards).
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass

import torch

from .errors import GlrsError

DATA_VERSION = 3  # 3: calibration files record their conditions (glrs.conditions)
OFFLINE = ("pydoc", "python-docs")
ONLINE = ("wikitext2", "c4")
ROLES = ("calibration", "validation", "evaluation")
# Enters the calibration key: the calibration text's rule, unchanged since the held-out half was split
# into validation and evaluation (which left the calibration text as it was).
SPLIT_RULE = ("document goes to evaluation iff int(sha256(name)[:8], 16) % 2 == 0; "
              "calibration drops paragraphs that occur in evaluation")


@dataclass(frozen=True)
class Text:
    dataset: str  # the spec that produced it
    split: str  # "calibration" | "validation" | "evaluation" (offline) or the dataset's split name
    text: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def doc_role(name: str) -> str:
    """Which text an offline document belongs to, by its name's hash: the first 8 hex digits pick
    calibration or held-out (the split of the two-text era, so calibration did not change), the
    next 8 split the held-out documents into validation and evaluation."""
    h = hashlib.sha256(name.encode()).hexdigest()
    if int(h[:8], 16) % 2:
        return "calibration"
    return "validation" if int(h[8:16], 16) % 2 == 0 else "evaluation"


def offline_documents(spec: str, role: str) -> list[tuple[str, str]]:
    """(name, text) of the documents of one role of an offline source, in name order, each cut to the
    paragraphs that no other text holds (load_text joins these)."""
    if role not in ROLES:
        raise ValueError(role)
    docs = _offline_documents(spec)
    roles = {name: doc_role(name) for name in docs}
    if role == "evaluation":
        return [(n, docs[n]) for n in sorted(docs) if roles[n] == "evaluation"]
    # calibration: nothing of the held-out half; validation: nothing of evaluation
    excluded = ("validation", "evaluation") if role == "calibration" else ("evaluation",)
    seen = {p.strip() for n in docs if roles[n] in excluded for p in docs[n].split("\n\n")}
    chosen = []
    for name in sorted(docs):
        if roles[name] == role:
            kept = [p for p in docs[name].split("\n\n") if p.strip() not in seen]
            if kept:
                chosen.append((name, "\n\n".join(kept)))
    return chosen


def _offline_documents(spec: str) -> dict[str, str]:
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return dict(topics)
    if spec == "python-docs":
        files = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.txt", recursive=True))
        if not files:
            raise GlrsError("dataset 'python-docs' needs Debian's Python documentation: apt install python3.11-doc")
        return {os.path.relpath(f, "/usr/share/doc"): open(f, encoding="utf-8").read() for f in files}
    if spec.startswith("file:"):
        path = spec[5:]
        if not os.path.isfile(path):
            raise GlrsError(f"dataset {spec!r}: no such file; give file:/path/to/text.txt")
        paragraphs = [p for p in open(path, encoding="utf-8").read().split("\n\n") if p.strip()]
        return {f"{i:08d}:{p[:64]}": p for i, p in enumerate(paragraphs)}
    raise GlrsError(f"unknown dataset {spec!r}; use one of {', '.join(OFFLINE + ONLINE)} or file:PATH")


def _online_text(spec: str, role: str) -> Text:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise GlrsError("online datasets need the `datasets` package: pip install datasets") from e
    try:
        if spec == "wikitext2":
            split = {"calibration": "train", "validation": "validation", "evaluation": "test"}[role]
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return Text(spec, split, "\n\n".join(rows))
        # C4: the first shard of the English training set, as Wanda and SparseGPT calibrate; evaluation the
        # first validation shard (as they evaluate), validation the second.
        shard = {"calibration": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00001-of-00008.json.gz",
                 "evaluation": "en/c4-validation.00000-of-00008.json.gz"}[role]
        rows = datasets.load_dataset("allenai/c4", data_files={"x": shard}, split="x")["text"]
        return Text(spec, shard, "\n\n".join(rows))
    except Exception as e:
        raise GlrsError(
            f"dataset {spec!r} could not be loaded from the hub ({type(e).__name__}: {e}); "
            "offline, use dataset 'pydoc' (ships with Python) or file:PATH"
        ) from e


def load_text(spec: str, role: str) -> Text:
    """The text of one role ('calibration', 'validation' or 'evaluation') of a dataset spec."""
    if role not in ROLES:
        raise ValueError(role)
    if spec in ONLINE:
        return _online_text(spec, role)
    chosen = offline_documents(spec, role)
    if not chosen:
        raise GlrsError(f"dataset {spec!r} has no documents for {role}; give a larger text")
    return Text(spec, role, "\n\n".join(text for _, text in chosen))


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """One token stream [1, N] for the whole text, tokenised once (the standard protocol)."""
    return tokenizer(text.text, return_tensors="pt").input_ids


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the stream.

    Wanda/SparseGPT draw random windows from random C4 documents; here the
    calibration text is one stream, so windows are drawn from it directly."""
    n = ids.shape[1]
    if n <= seqlen:
        raise GlrsError(
            f"calibration text has {n} tokens, fewer than one window of {seqlen}; lower calibration.seqlen or use a larger dataset"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[0, s : s + seqlen] for s in starts.tolist()])


def fingerprints(dataset: str, calibration: str) -> dict:
    """The three texts behind a record (docs/design.md section 8): the calibration text of the source
    `calibration` (None for the dense model, which saw none) and the validation and evaluation texts of
    `dataset`, each as text_identity gives it."""
    return {"calibration": text_identity(calibration, "calibration") if calibration else None,
            "validation": text_identity(dataset, "validation"),
            "evaluation": text_identity(dataset, "evaluation")}


def text_identity(spec: str, role: str) -> str:
    """What the content key of text-derived outputs hashes: the text itself when it is
    local (cheap, and exact across Python versions), the dataset's name when it is on the hub."""
    if spec in ONLINE:
        return f"{spec}:{role}"
    return load_text(spec, role).fingerprint
