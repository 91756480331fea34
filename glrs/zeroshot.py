"""Zero-shot accuracy through lm-eval (docs/design.md sections 7 and 8).

`run_zeroshot` loads a checkpoint directory, wraps the in-memory model in
lm-eval's `HFLM` and calls `lm_eval.simple_evaluate` on named tasks:

* PAPER_TASKS: lm-eval's built-in tasks of the CAP paper (boolq, rte,
  hellaswag, winogrande, arc_easy, arc_challenge, openbookqa). Their data live
  on the Hugging Face hub, so they need it to be reachable.
* OFFLINE_TASKS: tasks shipped with the project, cut deterministically from the
  *evaluation* text of an offline source (default: CPython's
  `pydoc_data.topics`, PSF licence; see glrs.data). `build_offline_tasks`
  writes them as lm-eval task YAML over local jsonl; every context and every
  gold answer is a verbatim span of that text (up to whitespace: wrapped lines
  are joined). Wrong choices are real sentences/words of the same evaluation
  text, never made up.

    glrs_lastword  LAMBADA-style: a passage of consecutive sentences of one
                   paragraph, cut before its final word; the model must
                   produce that word greedily (loglikelihood, acc = is_greedy).
                   Only passages whose final word is an alphabetic non-stopword
                   that already occurs earlier in the passage are kept, as in
                   LAMBADA most targets occur in the context: the task measures
                   use of the context rather than knowledge of rare words.
    glrs_nextsent  Which sentence comes next: context = one sentence, choices =
                   the true next sentence of the same paragraph and a sentence
                   of similar length from another document, in a seeded random
                   order (multiple_choice; chance 50%).
    glrs_cloze     Four-choice cloze: a sentence up to a content word (at least
                   its fourth word, never its last); each choice is a word
                   followed by the rest of the sentence; the three wrong words
                   are drawn from the evaluation text's own vocabulary, of
                   similar frequency and length, with the gold word's last two
                   letters where possible, absent from the sentence
                   (multiple_choice; chance 25%).

No example uses a sentence that also occurs in the calibration half.

With the default n=300 per task (lastword 300, nextsent 300 x 2 choices, cloze
300 x 4 choices = 2100 loglikelihood requests), the dense SmolLM2-135M-Instruct
(float32, CPU) scores lastword acc 0.517, nextsent acc 0.733 / acc_norm 0.770,
cloze acc 0.853 / acc_norm 0.857 (chance: ~0, 0.5, 0.25); the run took about
12 CPU-minutes (22 min wall on 2 heavily shared cores). Pass `limit` for a quick look.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import cas
from .errors import GlrsError

ZEROSHOT_VERSION = 1
TASKGEN_VERSION = 2  # 2: an example that recurs (a repeated paragraph) is kept once
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASKS = ("glrs_lastword", "glrs_nextsent", "glrs_cloze")
DEFAULT_N = 300  # examples per offline task (fewer if the text has fewer)
TASKGEN_SEED = 1234  # fixed: the generated tasks are part of the protocol, not of a run's seed

_STOP = frozenset(
    """a an the and or but if then else of to in on at by for with from as is are was were be been being
    it its this that these those there their they them he she we you your our his her not no nor so
    than too very can could may might must shall should will would do does did done has have had having
    which who whom whose what when where why how all any both each few more most other some such only
    own same also just into over under again further once here about above below between through during
    before after up down out off one two use used using see following example""".split()
)
_ABBREV = ("e.g.", "i.e.", "cf.", "vs.", "etc.", "Ex.", "ex.", "resp.", "approx.", "No.")
_WORD = re.compile(r"[A-Za-z]+")


# ---- text -> paragraphs -> sentences --------------------------------------------------------------

def _norm(s: str) -> str:
    return " ".join(s.split())


def _eval_documents(dataset: str) -> list[tuple[str, str]]:
    """The evaluation text of an offline dataset as (name, text) in load_text's order (glrs.data)."""
    from . import data

    if dataset in data.ONLINE:
        raise GlrsError(f"offline zero-shot tasks are cut from an offline text; {dataset!r} is a hub dataset (use pydoc, python-docs or file:PATH)")
    return data.offline_documents(dataset, "evaluation")


def _blocks(doc: str):
    """(start, end) offsets of the blank-line separated blocks of one raw document."""
    start = 0
    for m in re.finditer(r"\n[ \t]*\n", doc):
        if doc[start:m.start()].strip():
            yield start, m.start()
        start = m.end()
    if doc[start:].strip():
        yield start, len(doc)


def _prose(block: str) -> str | None:
    """A block as one line of prose, or None when it is not a prose paragraph.

    A paragraph is kept when all its lines share one indentation, it is not a
    heading, list item, grammar rule or code example, it has >= 8 words, mostly
    alphabetic, and it ends with a full stop."""
    lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
    if len({len(ln) - len(ln.lstrip()) for ln in lines}) != 1:
        return None
    if re.fullmatch(r"[=*\-^~#+]{3,}", lines[-1].strip()):
        return None
    text = " ".join(ln.strip() for ln in lines)
    if text.startswith((">>>", "...", "* ", "- ", "+ ", "|", "[")) or "::=" in text:
        return None
    words = text.split()
    if len(words) < 8 or not text.endswith(".") or not (text[0].isupper() or text[0] in "\"“*"):
        return None
    if sum(bool(re.fullmatch(r"[\"'(“]?[A-Za-z][a-z\-]*[\"'),.;:”]*", w)) for w in words) < 0.7 * len(words):
        return None
    return text


def _paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of one document, wrapped lines joined by single spaces."""
    return [p for p in (_prose(doc[s:e]) for s, e in _blocks(doc)) if p is not None]


def _raw_offset(block: str, nonspace: int) -> int:
    """Offset in `block` of the character preceded by `nonspace` non-whitespace characters."""
    seen = 0
    for i, ch in enumerate(block):
        if seen == nonspace and not ch.isspace():
            return i
        if not ch.isspace():
            seen += 1
    raise ValueError("offset beyond block")


def _sentences(par: str) -> list[str]:
    """Sentences of one paragraph (exact substrings of it); splits after . ! ? before a capital,
    not after common abbreviations."""
    out: list[str] = []
    start = 0
    for m in re.finditer(r"(?<=[.!?])\s+(?=[\"“(*]?[A-Z])", par):
        if par[start:m.start()].endswith(_ABBREV):
            continue
        out.append(par[start:m.start()])
        start = m.end()
    out.append(par[start:])
    return out


def _words(s: str) -> list[str]:
    return _WORD.findall(s.lower())


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _rng(*parts: str) -> random.Random:
    return random.Random(int(_digest(str(TASKGEN_SEED), *parts)[:16], 16))


def _select(cands: list[dict], n: int, group_key: str) -> list[dict]:
    """Up to n distinct candidates, deterministically: order by content hash, at most one per group first.
    Distinct: a paragraph that recurs in one document (pydoc's "types" says "This type has a single value."
    of three types) gives the same example more than once; it is kept once."""
    cands = sorted(cands, key=lambda c: c["_h"])
    distinct, shown = [], set()
    for c in cands:
        example = json.dumps({k: v for k, v in c.items() if not k.startswith("_")}, sort_keys=True)
        if example not in shown:
            shown.add(example)
            distinct.append(c)
    cands = distinct
    seen: set[str] = set()
    first, rest = [], []
    for c in cands:
        (rest if c[group_key] in seen else first).append(c)
        seen.add(c[group_key])
    picked = (first + rest)[:n]
    return sorted(picked, key=lambda c: c["_h"])


# ---- the three tasks ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _prepare(dataset: str):
    from . import data

    docs = _eval_documents(dataset)
    calib = _norm(data.load_text(dataset, "calibration").text)
    pars = []  # (doc name, paragraph index, [sentences], [sentence not in the calibration half])
    for name, text in docs:
        for j, par in enumerate(_paragraphs(text)):
            sents = _sentences(par)
            pars.append((name, j, sents, [_norm(s) not in calib for s in sents]))
    source = _norm("\n\n".join(t for _, t in docs))
    return docs, pars, source, calib


def _fresh_block(block: str, calib: str) -> bool:
    """No sentence (prose) or line (anything else) of 30+ characters also occurs in the calibration half."""
    prose = _prose(block)
    pieces = _sentences(prose) if prose else [_norm(ln) for ln in block.split("\n")]
    return all(len(p) < 30 or _norm(p) not in calib for p in pieces)


def _lastword(docs, calib: str, min_words: int = 50, max_words: int = 150) -> list[dict]:
    cands = []
    for name, doc in docs:
        blocks = list(_blocks(doc))
        fresh = [_fresh_block(doc[s:e], calib) for s, e in blocks]
        for bi, (bs, be) in enumerate(blocks):
            par = _prose(doc[bs:be])
            if par is None or not fresh[bi]:
                continue
            sents = _sentences(par)
            offset = 0
            for sent in sents:
                start_k = par.index(sent, offset)
                offset = start_k + len(sent)
                m = re.search(r"(?:^|\s)([A-Za-z]{3,})\.$", sent)
                if not m or m.group(1).lower() in _STOP:
                    continue
                word = m.group(1)
                idx = start_k + m.start(1)
                pos = bs + _raw_offset(doc[bs:be], sum(not c.isspace() for c in par[:idx]))
                assert doc[pos:pos + len(word)] == word
                bj = bi
                # whole blocks back to the first that gives >= min_words (passages stay <= max_words)
                while (bj > 0 and fresh[bj - 1] and len(doc[blocks[bj][0]:pos].split()) < min_words
                       and len(doc[blocks[bj - 1][0]:pos].split()) <= max_words):
                    bj -= 1
                context = doc[blocks[bj][0]:pos].rstrip()
                nwords = len(context.split())
                if not min_words <= nwords <= max_words or word.lower() not in set(_words(context)):
                    continue
                cands.append({"context": context, "target": word, "doc": name,
                              "_h": _digest("lw", name, context, word), "_g": f"{name}/{bi}"})
    return cands


def _nextsent(docs, pars) -> list[dict]:
    doc_text = {name: _norm(text) for name, text in docs}
    pool = sorted({s for _, _, sents, fresh in pars for s, f in zip(sents, fresh) if f and len(s.split()) >= 6})
    where = {s: {d for d, t in doc_text.items() if _norm(s) in t} for s in pool}  # documents quoting s
    cands = []
    for name, j, sents, fresh in pars:
        for i in range(len(sents) - 1):
            a, b = sents[i], sents[i + 1]
            if not (fresh[i] and fresh[i + 1]) or len(a.split()) < 6 or len(b.split()) < 6:
                continue
            h = _digest("ns", a, b)
            rng = _rng(h)
            near = [s for s in pool if name not in where[s] and abs(len(s) - len(b)) <= 0.2 * len(b)]
            if not near:
                continue
            wrong = rng.choice(near)
            label = rng.randrange(2)
            choices = [b, wrong] if label == 0 else [wrong, b]
            cands.append({"context": a, "choices": choices, "label": label, "doc": name, "_h": h, "_g": f"{name}/{j}"})
    return cands


def _cloze(pars, source: str) -> list[dict]:
    freq = Counter(w for w in re.findall(r"(?<![\w.])[a-z]+(?![\w(])", source))
    vocab = sorted((w for w, c in freq.items() if c >= 2 and len(w) >= 4 and w not in _STOP), key=lambda w: (-freq[w], w))
    rank = {w: i for i, w in enumerate(vocab)}
    cands = []
    for name, j, sents, fresh in pars:
        for k, sent in enumerate(sents):
            if not all(fresh[: k + 1]) or len(sent.split()) < 8:
                continue
            h = _digest("cz", name, str(j), str(k), sent)
            rng = _rng(h)
            # content words standing alone between spaces, not the first three words, not the last
            toks = list(re.finditer(r"(?<= )([a-z]{4,})(?= )", sent))
            toks = [t for t in toks if t.group(1) in rank and len(sent[: t.start()].split()) >= 3]
            if not toks:
                continue
            t = rng.choice(toks)
            gold = t.group(1)
            prefix = sent[: t.start()].rstrip()
            rest = sent[t.end():]
            present = set(_words(sent))
            r = rank[gold]
            # same ending (a cheap stand-in for the same part of speech: -ing, -ed, -ly, -s, ...) when possible
            window = [w for w in vocab[max(0, r - 150): r + 151]
                      if w != gold and w not in present and abs(len(w) - len(gold)) <= 3]
            near = [w for w in window if w[-2:] == gold[-2:]]
            if len(near) < 3:
                near = [w for w in window if abs(rank[w] - r) <= 60]
            if len(near) < 3:
                continue
            wrong = rng.sample(near, 3)
            words = [gold] + wrong
            rng.shuffle(words)
            choices = [w + rest for w in words]
            cands.append({"context": prefix, "choices": choices, "label": words.index(gold), "answer": gold,
                          "doc": name, "_h": h, "_g": f"{name}/{j}"})
    return cands


_YAML = {
    "glrs_lastword": """\
task: glrs_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: {version}
  source: {source}
""",
    "glrs_nextsent": """\
task: glrs_nextsent
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
  source: {source}
""",
}
_YAML["glrs_cloze"] = _YAML["glrs_nextsent"].replace("task: glrs_nextsent", "task: glrs_cloze")


def build_offline_tasks(out_dir: str | os.PathLike, dataset: str = "pydoc", n: int = DEFAULT_N) -> str:
    """Write OFFLINE_TASKS as lm-eval YAML + jsonl into out_dir; returns their fingerprint.

    Deterministic: the same text and n give byte-identical jsonl and the same
    fingerprint (which does not depend on out_dir, whose absolute path the YAML
    files name)."""
    docs, pars, source, calib = _prepare(dataset)
    sets = {
        "glrs_lastword": _select(_lastword(docs, calib), n, "_g"),
        "glrs_nextsent": _select(_nextsent(docs, pars), n, "_g"),
        "glrs_cloze": _select(_cloze(pars, source), n, "_g"),
    }
    for name, rows in sets.items():
        if len(rows) < min(n, 50):
            raise GlrsError(f"dataset {dataset!r} yields only {len(rows)} examples for {name}; use a larger text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256(f"glrs-zeroshot-tasks v{TASKGEN_VERSION}\n".encode())
    manifest = {"version": TASKGEN_VERSION, "dataset": dataset, "n": n, "tasks": {}}
    for name, rows in sets.items():
        body = "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, sort_keys=True) + "\n"
                       for r in rows).encode()
        template = _YAML[name]
        h.update(f"{name}\0".encode() + body + template.encode())
        jsonl = out / f"{name}.jsonl"
        cas.write_text_atomic(jsonl, body.decode("ascii"))
        yaml_text = template.format(data=json.dumps(str(jsonl.resolve())), version=TASKGEN_VERSION, source=json.dumps(dataset))
        cas.write_text_atomic(out / f"{name}.yaml", yaml_text)
        manifest["tasks"][name] = {"examples": len(rows), "sha256": hashlib.sha256(body).hexdigest()}
    fingerprint = h.hexdigest()
    manifest["fingerprint"] = fingerprint
    cas.write_json_atomic(out / "glrs_tasks.json", manifest)
    return fingerprint


# ---- running lm-eval ------------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (and the user has not switched it off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_tasks() -> tuple[str, ...]:
    """The paper's tasks when the hub is reachable, the shipped offline tasks otherwise."""
    return PAPER_TASKS if hub_reachable() else OFFLINE_TASKS


def _metric(res: dict, name: str):
    for key, val in res.items():
        if key.split(",")[0] == name and isinstance(val, (int, float)):
            return float(val)
    return None


def evaluate_model(model, tokenizer, tasks: list[str], limit: int | None = None, seed: int = 0,
                   batch_size: int = 16, task_dir: str | os.PathLike | None = None,
                   dataset: str = "pydoc", n: int = DEFAULT_N) -> dict:
    """lm-eval on an in-memory model; returns the record run_zeroshot writes (without the model fields)."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise GlrsError("no zero-shot tasks named; use glrs.zeroshot.OFFLINE_TASKS or PAPER_TASKS")
    offline = [t for t in tasks if t in OFFLINE_TASKS]
    online = [t for t in tasks if t not in OFFLINE_TASKS]
    if online and not hub_reachable():
        raise GlrsError(
            f"zero-shot tasks {', '.join(online)} need the Hugging Face hub, which is not reachable; "
            f"offline, use the shipped tasks {', '.join(OFFLINE_TASKS)}"
        )
    torch.manual_seed(seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="glrs-tasks-") as tmp:
        fingerprint = None
        if offline:
            if task_dir is None:
                task_dir = tmp
                fingerprint = build_offline_tasks(task_dir, dataset=dataset, n=n)
            else:
                built = json.loads((Path(task_dir) / "glrs_tasks.json").read_text())
                fingerprint, dataset, n = built["fingerprint"], built["dataset"], built["n"]
        manager = TaskManager(include_path=str(task_dir) if offline else None, include_defaults=bool(online))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=manager, log_samples=False,
            bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results = {}
    for t in tasks:
        res = out["results"].get(t)
        if res is None:
            raise GlrsError(f"lm-eval returned no result for task {t!r}")
        entry = {m: _metric(res, m) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity")}
        entry = {k: v for k, v in entry.items() if v is not None}
        ns = out.get("n-samples", {}).get(t, {})
        entry["examples"] = int(ns.get("effective", ns.get("original", 0)))
        entry["examples_total"] = int(ns.get("original", entry["examples"]))
        results[t] = entry
    return {
        "zeroshot_version": ZEROSHOT_VERSION,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _pkg_version("lm_eval"),
        "tasks": tasks,
        "task_set": "offline" if set(tasks) <= set(OFFLINE_TASKS) else "paper" if set(tasks) <= set(PAPER_TASKS) else "mixed",
        "offline_tasks": {"dataset": dataset, "n": n, "fingerprint": fingerprint, "generator_version": TASKGEN_VERSION} if offline else None,
        "num_fewshot": 0,
        "limit": limit,
        "seed": seed,
        "batch_size": batch_size,
        "results": results,
        "acc": {t: r.get("acc") for t, r in results.items()},
        "seconds": round(time.time() - t0, 3),
    }


def _pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def run_zeroshot(model_dir: str, tasks: list[str], out: str, device: str, limit: int | None, seed: int,
                 *, batch_size: int = 16, task_dir: str | None = None, dataset: str = "pydoc",
                 n: int = DEFAULT_N, dtype: str = "float32") -> dict:
    """Zero-shot accuracies of the checkpoint in model_dir on `tasks`, written to `out` as JSON."""
    import torch
    from transformers import AutoTokenizer

    from .pipeline import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model = load_model(model_dir, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    record = evaluate_model(model, tokenizer, tasks, limit=limit, seed=seed, batch_size=batch_size,
                            task_dir=task_dir, dataset=dataset, n=n)
    manifest = Path(model_dir) / "glrs_manifest.json"
    record.update({
        "model_dir": str(model_dir),
        "model_fp": json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None,
        "device": device,
        "dtype": dtype,
        "seconds_total": round(time.time() - t0, 3),
    })
    cas.write_json_atomic(out, record)
    return record
