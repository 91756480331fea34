"""`glrs verify`: recompute a sample of every kind of cached output and compare (docs/design.md section 4).

The CI reproducibility check. What it promises: the same inputs, parameters and
code, computed under the same conditions (glrs.conditions: device, dtype, CPU
thread count, torch and its BLAS / LAPACK, CPU instruction set), give the same
file bit for bit. Every output records its conditions, so verify recomputes each
sampled output from its *cached* inputs (one stage at a time) under the recorded
conditions: the recorded thread count is set for the recomputation, and the
recorded device is used when this machine has it. Stage 1 runs at a fixed thread
count inside glrs, so its bytes do not depend on any job's thread count at all.

Outcomes, one per sampled output:
- `identical`: the recomputed bytes equal the cached bytes.
- `close`: some condition differs (another machine, a GPU, another torch; each
  one is named) and the outputs agree within the stated tolerance (`TOLERANCE`).
- `DIFFERENT`: the bytes differ under the same conditions, or the numbers differ
  beyond the tolerance: the run is not reproducible.
- `skipped`: the output's inputs are no longer on disk.

Kinds: `rpca` (results/rpca), `calib` (results/calib), `stats` (results/stats: activation
statistics), `alloc` (results/alloc), `realise` (results/realise: CAP's realised layers),
`compressed` (results/compressed: the compact checkpoint, info.json; hf/ with export: dense). Outputs that
record no conditions (older files; stats and realise files so far) are recomputed under this
process's conditions and, where their bytes differ, compared numerically.

Under `stage1: weights` a run writes no Stage-1 file (glrs.stage1): there is nothing of kind
`rpca` to check; an allocation records which source it read (`inputs.stage1`: files or weights) and
is recomputed from the same, as is a compressed model (its info.json records `stage1`).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from . import allocate, cas, conditions, pipeline
from .errors import GlrsError
from .stage1 import Stage1, read_rpca_layer

KINDS = ("rpca", "calib", "stats", "alloc", "realise", "compressed")

# What "agree" means when a condition differs, per kind (docs/design.md section 4; printed by verify).
TOLERANCE = {
    "rpca": 1e-5,        # ||L - L'||_F and ||S - S'||_F relative to ||L + S||_F, per matrix
    "calib": 0,          # token ids: exact
    "stats": 1e-5,       # ||H - H'||_F / ||H||_F per activation second-moment matrix
    "realise": 1e-5,     # ||T - T'||_F / ||T||_F per floating tensor; index tensors exact
    "alloc": 1e-3,       # share of mask entries (or of a matrix's budget) that may differ, per matrix
    "compressed": 1e-5,  # ||T - T'||_F / ||T||_F per floating tensor; other tensors and files exact
}
TOLERANCE_TEXT = {
    "rpca": "relative Frobenius error of L and of S <= 1e-5 per matrix",
    "calib": "token ids equal",
    "stats": "relative Frobenius error <= 1e-5 per tensor",
    "realise": "relative Frobenius error <= 1e-5 per tensor, indices equal",
    "alloc": "<= 0.1% of mask entries (or of a matrix's budget) differ per matrix",
    "compressed": "relative Frobenius error <= 1e-5 per tensor",
}


def verify(results: str | Path = "results", sample: int = 2, seed: int = 0,
           kinds: tuple[str, ...] | list[str] = KINDS, on_result=None) -> list[dict]:
    """Recompute `sample` outputs of each kind (chosen with `seed`) and compare them with the cached ones.

    Returns one record per output: kind, file, status (identical / close / DIFFERENT /
    skipped), conditions_differ (list of 'name: recorded -> now'), detail. `on_result(record)`,
    if given, is called as each one is done."""
    results = Path(results)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise GlrsError(f"unknown kind(s) {bad}; use some of {', '.join(KINDS)}")
    candidates = {
        "rpca": sorted(results.glob("rpca/*/*/layer_*.safetensors")),
        "calib": sorted(results.glob("calib/*/*.safetensors")),
        "stats": sorted(results.glob("stats/*/*/layer_*.safetensors")),
        "realise": sorted(results.glob("realise/*/layer_*.safetensors")),
        "alloc": sorted(results.glob("alloc/*.json")),
        "compressed": sorted(p for p in results.glob("compressed/*") if (p / "info.json").is_file()),
    }
    if not any(candidates[k] for k in kinds):
        raise GlrsError(f"nothing under {results} to verify; run the pipeline first")
    report = []
    with tempfile.TemporaryDirectory(prefix="glrs-verify-") as tmp:
        for kind in kinds:
            files = candidates[kind]
            chosen = sorted(random.Random(seed).sample(files, min(sample, len(files))))
            for i, path in enumerate(chosen):
                out = Path(tmp) / f"{kind}-{i}"
                rec = {"kind": kind, "file": str(path), **_CHECKS[kind](results, path, out)}
                report.append(rec)
                if on_result:
                    on_result(rec)
    return report


# ---- one check per kind ---------------------------------------------------------------------------

def _outcome(kind: str, cached: Path, fresh: Path, recorded: dict | None, now: dict, numeric) -> dict:
    """identical if the bytes agree; else DIFFERENT under the same conditions; else the numeric check."""
    same_bytes, which = _same_bytes(cached, fresh)
    differ = conditions.differences(recorded, now)
    rec = {"conditions_differ": differ, "tolerance": TOLERANCE_TEXT[kind]}
    if same_bytes:
        return rec | {"status": "identical", "detail": ""}
    if not differ:
        return rec | {"status": "DIFFERENT", "detail": f"bytes differ under the same conditions ({which})"}
    ok, detail = numeric(cached, fresh)
    return rec | {"status": "close" if ok else "DIFFERENT", "detail": detail}


def _same_bytes(a: Path, b: Path) -> tuple[bool, str]:
    if a.is_file():
        return cas.sha256_file(a) == cas.sha256_file(b), a.name
    fa, fb = _tree(a), _tree(b)
    if set(fa) != set(fb):
        return False, f"files {sorted(set(fa) ^ set(fb))}"
    differ = [r for r in fa if cas.sha256_file(fa[r]) != cas.sha256_file(fb[r])]
    return not differ, ", ".join(differ)


def _tree(d: Path) -> dict[str, Path]:
    """The files of an output directory, without Snakemake's bookkeeping (.snakemake_timestamp)."""
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".snakemake")}


def _check_rpca(results: Path, path: Path, out: Path) -> dict:
    meta, _ = read_rpca_layer(path)
    recorded = meta.get("conditions")
    device = conditions.device_for(recorded)
    model_dir = results / "model" / path.parent.parent.name
    if not model_dir.is_dir():
        return _skipped(f"its model {model_dir} is gone")
    pipeline.decompose_layer(str(model_dir), meta["layer"], meta["params"], str(out), device)
    now, _ = read_rpca_layer(out)
    return _outcome("rpca", path, out, recorded, now["conditions"], _rpca_numeric)


def _check_calib(results: Path, path: Path, out: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["glrs"])
    recorded = meta.get("conditions")
    model_dir = results / "model" / path.parent.name
    if not model_dir.is_dir():
        return _skipped(f"its model {model_dir} is gone")
    params = {k: v for k, v in meta.items() if k not in ("split", "text_sha256", "seed", "conditions")}
    with conditions.pinned_threads(_threads(recorded)):
        now = pipeline.calibrate(str(model_dir), params, meta["seed"], str(out))["conditions"]
    return _outcome("calib", path, out, recorded, now, _tensors_numeric("calib"))


def _check_alloc(results: Path, path: Path, out: Path) -> dict:
    info = json.loads(path.read_text())
    recorded = info.get("conditions")
    keys = info.get("inputs") or _alloc_inputs_from_models(results, path.stem)
    if keys is None or "stage1_key" not in keys:
        return _skipped("it records no Stage-1 key (made by an older glrs) and no compressed model names one")
    stage1, rpca_files = _stage1(results, keys)
    model_dir = results / "model" / keys["model_key"]
    calib = results / "calib" / keys["model_key"] / f"{keys['calib_key']}.safetensors" if keys.get("calib_key") else None
    stats_files = [results / "stats" / keys["model_key"] / keys["stats_key"] / f"layer_{i}.safetensors"
                   for i in keys["layers"]] if keys.get("stats_key") else []
    missing = [str(p) for p in [*rpca_files, model_dir, *([calib] if calib else []), *stats_files] if not p.exists()]
    if missing:
        return _skipped(f"its inputs are gone: {missing[:3]}")
    out.mkdir(parents=True)
    cached_masks = path.with_suffix(".safetensors")
    has_masks = cached_masks.exists()
    fresh_json, fresh_masks = out / path.name, out / f"{path.stem}.safetensors"
    with conditions.pinned_threads(_threads(recorded)):
        now = pipeline.run_allocator(
            stage1, info["allocator"], info["target_density"], info["allocator_params"],
            info["seed"], str(model_dir), str(calib) if calib else None, str(fresh_json),
            str(fresh_masks) if has_masks else None,
            conditions.device_for(recorded), [str(p) for p in stats_files] or None,
        )["conditions"]
    pair, fresh = out / "cached", out / "fresh"
    pair.mkdir()
    fresh.mkdir()
    (pair / path.name).symlink_to(path.resolve())
    fresh_json.rename(fresh / path.name)
    if has_masks:
        (pair / cached_masks.name).symlink_to(cached_masks.resolve())
        fresh_masks.rename(fresh / cached_masks.name)
    return _outcome("alloc", pair, fresh, recorded, now, _alloc_numeric)


def _check_stats(results: Path, path: Path, out: Path) -> dict:
    """Activation statistics: the dense model's forward pass over the calibration windows, all layers at once."""
    from . import stats

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["glrs"])
    recorded = meta.get("conditions")
    model_key = path.parent.parent.name
    model_dir = results / "model" / model_key
    calibs = sorted((results / "calib" / model_key).glob("*.safetensors"))
    if not model_dir.is_dir() or len(calibs) != 1:
        return _skipped(f"its model or its one calibration file under {results / 'calib' / model_key} is not there")
    done = out.parent / f"stats-{model_key}-{path.parent.name}"  # one forward pass serves every sampled layer
    if not done.is_dir():
        with conditions.pinned_threads(_threads(recorded)):
            stats.collect(str(model_dir), pipeline.load_calibration(calibs[0]), meta["layers"], str(done),
                          conditions.device_for(recorded))
    fresh = done / path.name
    now = conditions.current(conditions.device_for(recorded))
    return _outcome("stats", path, fresh, recorded, now, _tensors_numeric("stats"))


def _check_realise(results: Path, path: Path, out: Path) -> dict:
    """One realised layer, from the model, the layer's activation statistics and the allocation."""
    from . import realise

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["glrs"])
    recorded = meta.get("conditions")
    realise_key = path.parent.name
    info = next((i for i in map(lambda f: json.loads(f.read_text()), results.glob("compressed/*/info.json"))
                 if i.get("realise_key") == realise_key), None)
    if info is None:
        return _skipped("no compressed model names its realisation key (needed to find its inputs)")
    model_dir = results / "model" / info["model_key"]
    stats_file = results / "stats" / info["model_key"] / info["stats_key"] / f"layer_{meta['layer']}.safetensors"
    alloc_json = results / "alloc" / f"{info['alloc_key']}.json"
    missing = [str(p) for p in (model_dir, stats_file, alloc_json) if not p.exists()]
    if missing:
        return _skipped(f"its inputs are gone: {missing}")
    device = conditions.device_for(recorded)
    with conditions.pinned_threads(_threads(recorded)):
        realise.realise_layer(str(model_dir), str(stats_file), str(alloc_json), meta["layer"], meta["params"], str(out), device)
    return _outcome("realise", path, out, recorded, conditions.current(device), _tensors_numeric("realise"))


def _stage1(results: Path, keys: dict) -> tuple[Stage1, list[Path]]:
    """The Stage 1 an allocation or a compressed model was made from (`keys`: model_key, stage1_key, layers,
    and `stage1`: "weights" (split in memory, no file) or "files"/"rpca" (the decompose files)), and the
    Stage-1 files it needs."""
    model_dir = results / "model" / keys["model_key"]
    if keys.get("stage1") == "weights":
        return Stage1.from_weights(model_dir, keys["layers"], keys["stage1_key"]), []
    files = [results / "rpca" / keys["model_key"] / keys["stage1_key"] / f"layer_{i}.safetensors" for i in keys["layers"]]
    return Stage1.from_files(files), files


def _alloc_inputs_from_models(results: Path, alloc_key: str) -> dict | None:
    for info_file in results.glob("compressed/*/info.json"):
        info = json.loads(info_file.read_text())
        if info.get("alloc_key") == alloc_key:
            return {k: info[k] for k in ("model_key", "stage1_key", "layers", "stage1")}
    return None


def _check_compressed(results: Path, path: Path, out: Path) -> dict:
    info = json.loads((path / "info.json").read_text())
    cond_file = path / "conditions.json"
    recorded = json.loads(cond_file.read_text()) if cond_file.is_file() else None
    model_dir = results / "model" / info["model_key"]
    device = conditions.device_for(recorded)
    # The cached info.json is passed back as the run record: the stage overwrites every field it
    # computes, so the recomputed info.json equals the cached one exactly when those fields agree.
    if info.get("realise_key"):
        realised = [results / "realise" / info["realise_key"] / f"layer_{i}.safetensors" for i in info["layers"]]
        alloc_json = results / "alloc" / f"{info['alloc_key']}.json"
        missing = [str(p) for p in [model_dir, *realised, alloc_json] if not p.exists()]
        if missing:
            return _skipped(f"its inputs are gone: {missing[:3]}")
        with conditions.pinned_threads(_threads(recorded)):
            pipeline.materialise_realised(str(model_dir), [str(p) for p in realised], str(alloc_json), info, str(out))
    elif info["method"] == "cap":
        if "stage1_key" not in info:
            return _skipped("it records no Stage-1 key (made by an older glrs)")
        stage1, rpca_files = _stage1(results, info)
        alloc_json, masks = results / "alloc" / f"{info['alloc_key']}.json", results / "alloc" / f"{info['alloc_key']}.safetensors"
        missing = [str(p) for p in [model_dir, *rpca_files, alloc_json] if not p.exists()]
        if missing:
            return _skipped(f"its inputs are gone: {missing[:3]}")
        with conditions.pinned_threads(_threads(recorded)):
            pipeline.materialise(str(model_dir), stage1, str(masks) if masks.exists() else None, str(alloc_json), info, str(out))
    else:
        calib = results / "calib" / info["model_key"] / f"{info['calib_key']}.safetensors"
        missing = [str(p) for p in (model_dir, calib) if not p.exists()]
        if missing:
            return _skipped(f"its inputs are gone: {missing}")
        with conditions.pinned_threads(_threads(recorded)):
            pipeline.compress_baseline(str(model_dir), str(calib), info["method"], info["target_density"],
                                       info.get("method_params", {}), info["seed"], info, str(out), device)
    now = json.loads((out / "conditions.json").read_text())
    return _outcome("compressed", path, out, recorded, now, _dir_numeric)


def _skipped(why: str) -> dict:
    return {"status": "skipped", "detail": f"cannot recompute: {why}", "conditions_differ": [], "tolerance": ""}


def _threads(recorded: dict | None) -> int | None:
    return int(recorded["threads"]) if recorded and recorded.get("threads") else None


_CHECKS = {"rpca": _check_rpca, "calib": _check_calib, "stats": _check_stats, "alloc": _check_alloc,
           "realise": _check_realise, "compressed": _check_compressed}


# ---- numeric comparisons (used only when a condition differs) ------------------------------------

def _load(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def _rpca_numeric(a: Path, b: Path) -> tuple[bool, str]:
    meta_a, ta = read_rpca_layer(a)
    meta_b, tb = read_rpca_layer(b)
    if set(meta_a["matrices"]) != set(meta_b["matrices"]):
        return False, "different matrices"
    worst, where = 0.0, ""
    for short, m in meta_a["matrices"].items():
        La, Sa = _rpca_parts(ta, short, m["shape"])
        Lb, Sb = _rpca_parts(tb, short, m["shape"])
        scale = max(float(torch.linalg.norm(La + Sa)), 1e-300)
        err = max(float(torch.linalg.norm(La - Lb)), float(torch.linalg.norm(Sa - Sb))) / scale
        if err >= worst:
            worst, where = err, short
    ok = worst <= TOLERANCE["rpca"]
    return ok, f"largest relative error {worst:.2e} ({where}) {'<=' if ok else '>'} {TOLERANCE['rpca']:.0e}"


def _rpca_parts(t: dict, short: str, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    U, s, V = (t[f"{short}.{p}"].double() for p in ("U", "sigma", "V"))
    S = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    S[t[f"{short}.S_index"]] = t[f"{short}.S_values"].double()
    return (U * s) @ V.T, S.reshape(shape)


def _tensors_numeric(kind: str):
    def check(a: Path, b: Path) -> tuple[bool, str]:
        return _compare_tensors(_load(a)[1], _load(b)[1], TOLERANCE[kind])
    return check


def _compare_tensors(ta: dict, tb: dict, rtol: float) -> tuple[bool, str]:
    if set(ta) != set(tb):
        return False, f"different tensors: {sorted(set(ta) ^ set(tb))[:4]}"
    worst, where = 0.0, ""
    for k in ta:
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, f"{k}: shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if x.is_floating_point() and rtol > 0:
            x, y = x.double(), y.double()
            err = float(torch.linalg.norm(x - y)) / max(float(torch.linalg.norm(x)), 1e-300)
        else:
            err = 0.0 if torch.equal(x, y) else float("inf")
        if err >= worst:
            worst, where = err, k
    ok = worst <= rtol
    return ok, f"largest relative error {worst:.2e} ({where}) {'<=' if ok else '>'} {rtol:.0e}"


def _alloc_numeric(a: Path, b: Path) -> tuple[bool, str]:
    """The keep-masks where the allocation wrote them, else its per-matrix budgets: the share of entries
    (of the masks, or of each matrix's parameter budget) that differ."""
    if next(a.glob("*.safetensors"), None) is None:
        return _budgets_numeric(json.loads(next(a.glob("*.json")).read_text())["matrices"],
                                json.loads(next(b.glob("*.json")).read_text())["matrices"])

    def masks(folder: Path) -> dict[str, torch.Tensor]:
        alloc = allocate.load_masks(next(folder.glob("*.safetensors")))
        return {f"{k}.rank_keep": v for k, v in alloc.rank_keep.items()} | {f"{k}.sparse_keep": v for k, v in alloc.sparse_keep.items()}

    masks_a, masks_b = masks(a), masks(b)
    if set(masks_a) != set(masks_b):
        return False, "different matrices"
    worst, where = 0.0, ""
    for k in masks_a:
        if masks_a[k].shape != masks_b[k].shape:
            return False, f"{k}: {tuple(masks_a[k].shape)} vs {tuple(masks_b[k].shape)} entries"
        share = float((masks_a[k] != masks_b[k]).float().mean()) if masks_a[k].numel() else 0.0
        if share >= worst:
            worst, where = share, k
    ok = worst <= TOLERANCE["alloc"]
    return ok, f"largest share of differing mask entries {worst:.2e} ({where}) {'<=' if ok else '>'} {TOLERANCE['alloc']:.0e}"


def _budgets_numeric(ma: dict, mb: dict) -> tuple[bool, str]:
    if set(ma) != set(mb):
        return False, "different matrices"
    worst, where = 0.0, ""
    for k, x in ma.items():
        y = mb[k]
        m, n = x["shape"]
        spent = [r * (m + n) + s for r, s in ((x["rank"], x["nnz"]), (y["rank"], y["nnz"]))]
        share = (abs(x["rank"] - y["rank"]) * (m + n) + abs(x["nnz"] - y["nnz"])) / max(spent[0], 1)
        if share >= worst:
            worst, where = share, k
    ok = worst <= TOLERANCE["alloc"]
    return ok, f"largest share of a matrix's budget that differs {worst:.2e} ({where}) {'<=' if ok else '>'} {TOLERANCE['alloc']:.0e}"


def _dir_numeric(a: Path, b: Path) -> tuple[bool, str]:
    fa, fb = _tree(a), _tree(b)
    if set(fa) != set(fb):
        return False, f"different files: {sorted(set(fa) ^ set(fb))[:4]}"
    details = []
    for rel in fa:
        if rel == "conditions.json" or cas.sha256_file(fa[rel]) == cas.sha256_file(fb[rel]):
            continue
        if rel.endswith(".safetensors"):
            ok, d = _compare_tensors(_load(fa[rel])[1], _load(fb[rel])[1], TOLERANCE["compressed"])
        elif rel.endswith(".json"):
            ok, d = _json_close(json.loads(fa[rel].read_text()), json.loads(fb[rel].read_text())), "numbers within tolerance"
        else:
            ok, d = False, "differs"
        if not ok:
            return False, f"{rel}: {d}"
        details.append(f"{rel}: {d}")
    return True, "; ".join(details) or "only conditions.json differs"


def _json_close(x, y, rtol: float = TOLERANCE["compressed"]) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return set(x) == set(y) and all(_json_close(x[k], y[k], rtol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_json_close(u, v, rtol) for u, v in zip(x, y))
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= rtol * max(abs(x), abs(y), 1e-300)
    return x == y
