"""The pipeline's stages as plain functions: what each Snakemake rule runs through the CLI.

Each stage reads its inputs from paths, writes its outputs atomically, and
records in its outputs only what is deterministic (no timings, no host names),
so the same inputs give bit-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import allocate, cap, cas, compressed, conditions, data, gpuslots, modelio, rpca, stage1
from .errors import GlrsError
from .stage1 import Stage1



# ---- Stage 1 ---------------------------------------------------------------------------------

def decompose_layer(model_dir: str, layer: int, params: dict, out: str, device: str = "auto") -> dict:
    """RPCA of the seven target matrices of one layer; reads only that layer from disk."""
    weights = modelio.read_layer(model_dir, layer)
    with gpuslots.device_slot(device) as dev:
        return _decompose(weights, layer, params, out, dev)


def _decompose(weights: dict[str, torch.Tensor], layer: int, params: dict, out: str, device: str) -> dict:
    """The file's metadata records the conditions of its bytes (glrs.conditions); the CPU math runs
    under the fixed SOLVER_THREADS, so the job's thread count is not one of them."""
    with conditions.pinned_threads(conditions.SOLVER_THREADS):
        return _decompose_pinned(weights, layer, params, out, device)


def _decompose_pinned(weights: dict[str, torch.Tensor], layer: int, params: dict, out: str, device: str) -> dict:
    tensors, matrices = {}, {}
    for short, W in weights.items():
        lam = params["lambda_scale"] * rpca.default_lambda(tuple(W.shape))
        if params.get("method", "ialm") == "none":
            res = rpca.no_split(W)
        else:
            res = rpca.rpca(
                W, lam=lam, tol=params["tol"], max_iter=params["max_iter"], rho=params["rho"],
                mu_factor=params["mu_factor"], dtype=getattr(torch, params["dtype"]), device=device,
                threads=conditions.SOLVER_THREADS,
            )
        tensors |= stage1.layer_tensors(short, res, W.dtype)
        matrices[short] = {
            "name": modelio.weight_name(layer, short),
            "shape": list(W.shape),
            "lambda": lam,
            "iterations": res.iterations,
            "residual": res.residual,
            "converged": res.converged,
            "rank": int(res.sigma.numel()),
            "nnz": int(tensors[f"{short}.S_values"].numel()),
        }
    cond = conditions.current(device, params["dtype"], threads=conditions.SOLVER_THREADS)
    meta = {"layer": layer, "matrices": matrices, "params": params, "conditions": cond}
    with cas.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"glrs": cas.canonical_json(meta)})
    return meta


# ---- Calibration ------------------------------------------------------------------------------

def calibrate(model_dir: str, params: dict, seed: int, out: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = data.load_text(params["dataset"], "calibration")
    ids = data.calibration_samples(data.tokenize(tokenizer, text), params["nsamples"], params["seqlen"], seed)
    meta = {"dataset": text.dataset, "split": text.split, "text_sha256": text.fingerprint, "seed": seed, **params,
            "conditions": conditions.current("cpu") | conditions.packages("tokenizers", "transformers")}
    with cas.atomic_path(out) as tmp:
        save_file({"input_ids": ids.contiguous()}, str(tmp), metadata={"glrs": cas.canonical_json(meta)})
    return meta


def load_calibration(path: str | Path) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("input_ids")
    except Exception as e:
        raise GlrsError(f"cannot read calibration ids {path}: {e}; delete the file and rerun its calibrate job") from e


def check_readable(path: str | Path, what: str, fix: str) -> None:
    """Open a safetensors intermediate's header (cheap) so that a truncated or damaged file, which
    safetensors reports without its name, becomes a GlrsError naming the file and the fix."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:
        raise GlrsError(f"cannot read {what} {path}: {e}; {fix}") from e


def collect_activations(model_dir: str, calib_file: str, layers: list[int], out_dir: str, device: str = "auto") -> dict:
    """The dense model's input second moments per target, one file per layer (glrs.stats)."""
    from . import stats

    with gpuslots.device_slot(device) as dev:
        return stats.collect(model_dir, load_calibration(calib_file), layers, out_dir, dev)


# ---- Stage 2 ----------------------------------------------------------------------------------

def _budgets_only(allocator: str, params: dict) -> bool:
    """Whether the allocator decides per-matrix budgets only (no candidate's value): uniform, owl, CAP's
    budget policy -- the prefix-keeping allocators but the global thresholds of rpca-threshold."""
    return allocator != "rpca-threshold" and cap.keeps_prefixes(allocator, params)


def run_allocator(stage1: Stage1, allocator: str, density: float, params: dict, seed: int,
                  model_dir: str | None, calib_file: str | None, json_out: str, masks_out: str | None = None,
                  device: str = "auto", stats_files: list[str] | None = None) -> dict:
    """One allocation from every layer's Stage-1 candidates (a glrs.stage1.Stage1: the decompose
    files, or under stage1 weights the model's weights).
    The json holds the per-matrix budgets; the per-candidate keep-masks go to `masks_out` only when
    given (realise.mode select reads them; the realisers need only the budgets)."""
    stage1.check_readable()
    pools = stage1.pools(values=not _budgets_only(allocator, params))
    used, stage2 = "cpu", None
    if allocator == "uniform":
        alloc = allocate.uniform(pools, density, **params)
    elif allocator == "rpca-threshold":
        alloc = allocate.rpca_threshold(pools, density, **params)
    elif allocator == "owl":
        if not model_dir or not stats_files:
            raise GlrsError("the owl allocator needs --model-dir and --stats (the activations job's files)")
        alloc = allocate.owl(pools, density, model_dir, stats_files, **params)
    elif allocator in allocate.NEEDS_CALIBRATION:
        with gpuslots.device_slot(device) as dev:
            used = dev
            alloc, stage2 = cap.allocate_with_info(pools, density, params, seed, model_dir, stage1,
                                                   load_calibration(calib_file), allocator, dev, stats_files)
    else:
        raise GlrsError(f"unknown allocator {allocator!r}; use one of {', '.join(allocate.ALLOCATORS)}")
    info = allocate.summarise(pools, alloc, density)
    info |= {"allocator": allocator, "allocator_params": params, "seed": seed}
    if stage2:
        info["stage2"] = {k: stage2[k] for k in ("policy", "steps", "skipped_steps", "surrogate_loss_uniform",
                                                  "surrogate_loss_learned", "theta", "expected_density") if k in stage2}
    info |= {"inputs": conditions.input_keys(stage1.keys(), calib_file, stats_files), "conditions": conditions.current(used)}
    allocate.save(alloc, info, json_out, masks_out)
    return info


# ---- Materialise --------------------------------------------------------------------------------

def kept_factors(layer_tensors: dict[str, torch.Tensor], short: str, rank_keep: torch.Tensor,
                 sparse_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    idx = layer_tensors[f"{short}.S_index"][sparse_keep]
    order = torch.argsort(idx)
    return {
        "U": layer_tensors[f"{short}.U"][:, rank_keep],
        "sigma": layer_tensors[f"{short}.sigma"][rank_keep],
        "V": layer_tensors[f"{short}.V"][:, rank_keep],
        "S_index": idx[order],
        "S_values": layer_tensors[f"{short}.S_values"][sparse_keep][order],
    }


def materialise(model_dir: str, stage1: Stage1, masks_file: str | None, alloc_json: str,
                run_info: dict, out: str, export: str = "none") -> dict:
    """The compressed model (glrs.compressed) of the kept Stage-1 candidates (from a glrs.stage1.Stage1): the
    paper's realise.mode select. The keep-masks file is needed only where the allocation did not keep prefixes
    (CAP's per-candidate policies)."""
    alloc_info = json.loads(Path(alloc_json).read_text())
    if masks_file is not None:
        masks = allocate.load_masks(masks_file)
    elif alloc_info.get("kept", "prefixes" if cap.keeps_prefixes(alloc_info["allocator"], alloc_info["allocator_params"])
                        else "masks") == "prefixes":  # allocations before "kept" was recorded: by their allocator
        masks = allocate.Allocation.of_prefixes(alloc_info["matrices"])
    else:
        raise GlrsError(f"{alloc_json}: this allocation kept candidates that are not prefixes, so its keep-masks "
                        "are needed: pass --masks (its allocate job writes them with --masks-out)")
    factors, shapes = {}, {}
    for meta, tensors in stage1.read():
        for short, m in meta["matrices"].items():
            factors[m["name"]] = kept_factors(tensors, short, masks.rank_keep[m["name"]], masks.sparse_keep[m["name"]])
            shapes[m["name"]] = m["shape"]
    info = _model_record(
        model_dir, run_info,
        target_density=alloc_info["target_density"],
        achieved_density=alloc_info["achieved_density"],
        params_kept=compressed.factored_parameter_count(factors),
        params_dense=alloc_info["params_dense"],
    )
    return _write_compressed(out, model_dir, _by_layer(factors, shapes), info, export=export)


def materialise_realised(model_dir: str, realised_files: list[str], alloc_json: str, run_info: dict, out: str,
                         export: str = "none") -> dict:
    """The compressed model from the per-layer realisation jobs (glrs.realise), streamed one layer file at
    a time into the compact format: only one layer's factors are held."""
    from . import realise

    alloc_info = json.loads(Path(alloc_json).read_text())
    counted = {"kept": 0, "params": None}

    def layers():
        for path in realised_files:
            meta, layer_factors = realise.read_realised(path)
            counted["kept"] += compressed.factored_parameter_count(layer_factors)
            counted["params"] = meta["params"]
            yield meta["layer"], layer_factors, {rec["name"]: rec["shape"] for rec in meta["matrices"].values()}

    def record():
        return _model_record(
            model_dir, run_info,
            target_density=alloc_info["target_density"],
            achieved_density=counted["kept"] / alloc_info["params_dense"],
            params_kept=counted["kept"],
            params_dense=alloc_info["params_dense"],
            realisation=counted["params"],
        )

    return _write_compressed(out, model_dir, layers(), record, export=export)


def _by_layer(factors: dict, shapes: dict):
    """(layer, name -> parts, name -> shape) in layer order, from whole-model dicts."""
    layers: dict[int, list[str]] = {}
    for name in factors:
        layers.setdefault(int(name.split(".")[2]), []).append(name)
    for i in sorted(layers):
        yield i, {n: factors[n] for n in layers[i]}, {n: list(shapes[n]) for n in layers[i]}


def _model_record(model_dir: str, run_info: dict, **fields) -> dict:
    """What every compressed model's info.json holds: the run, the source model, then `fields`."""
    manifest = modelio.read_manifest(model_dir)
    return {**run_info, "model": manifest["spec"], "model_fp": manifest["fingerprint"], **fields}


def _write_compressed(out: str, model_dir: str, layers, info, device: str = "cpu", export: str = "none") -> dict:
    """The compact checkpoint (glrs.compressed), info.json (with the bytes shipped) and conditions.json
    (glrs.conditions: what the bytes depend on), plus the dense export when asked; all or nothing.
    `info`: the record, or a function giving it once `layers` is consumed."""
    if export not in compressed.EXPORTS:
        raise GlrsError(f"config key export: {export!r} is not one of {list(compressed.EXPORTS)}")
    with cas.atomic_dir(out) as tmp:
        cas.write_json_atomic(tmp / "conditions.json", conditions.current(device))
        compressed.write_model(tmp, model_dir, layers)
        info = info() if callable(info) else info
        info = info | {"bytes": compressed.directory_bytes(tmp), "bytes_dense": _dense_bytes(model_dir)}
        if export == "dense":
            compressed.write_dense_export(tmp, tmp / compressed.DENSE_DIR)
        cas.write_json_atomic(tmp / "info.json", info)
    return info


def _dense_bytes(model_dir: str) -> dict[str, int]:
    """The prepared model's bytes: its target matrices and its whole directory (what the compressed sizes compare with)."""
    manifest = modelio.read_manifest(model_dir)
    esize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[manifest.get("dtype", "float32")]
    targets = sum(m * n for m, n in manifest["targets"].values()) * manifest["num_layers"]
    total = sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file() and p.name != modelio.MANIFEST)
    return {"targets": targets * esize, "directory": total}


def compress_baseline(model_dir: str, calib_file: str, method: str, density: float, params: dict, seed: int,
                      run_info: dict, out: str, device: str = "auto", export: str = "none") -> dict:
    """A baseline method (glrs.methods) at the same budget, written in the same layout as CAP's models."""
    from transformers import AutoModelForCausalLM

    from .layers import target_shapes
    from .methods import base, get_method

    impl = get_method(method)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shapes = target_shapes(model)
    with gpuslots.device_slot(device) as dev:
        result = impl.compress(model, load_calibration(calib_file), density, params, seed, dev)
        used = dev
    info = _model_record(
        model_dir, run_info,
        target_density=density,
        achieved_density=base.density_of(result.params_kept, shapes),
        params_kept=sum(result.params_kept.values()),
        params_dense=sum(m * n for m, n in shapes.values()),
        details=result.details,
    )
    factors = result.factors or {name: compressed.parts_from_dense(W) for name, W in result.weights.items()}
    return _write_compressed(out, model_dir, _by_layer(factors, shapes), info, used, export)


def dense_run_info(model_dir: str) -> dict:
    """The uncompressed model as a row of the summary: method 'dense', density 1."""
    manifest = modelio.read_manifest(model_dir)
    targets = sum(m * n for m, n in manifest["targets"].values()) * manifest["num_layers"]
    return {"method": "dense", "allocator": "", "model": manifest["spec"], "model_fp": manifest["fingerprint"],
            "model_key": Path(model_dir).name, "comp_key": "", "seed": "",
            "target_density": 1.0, "achieved_density": 1.0, "params_kept": targets, "params_dense": targets}


# ---- Evaluation ---------------------------------------------------------------------------------

def load_model(path: str, dtype: str, device: str):
    """What evaluation runs: a compressed model as it loads from its compact files (glrs.compressed.load), so
    the numbers are those of what a user ships; the prepared dense model as Hugging Face loads it."""
    if compressed.is_compressed(path):
        return compressed.load(path, device, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()


def evaluate_ppl(model_path: str, info_file: str | None, dataset: str, seqlen: int, max_tokens: int | None,
                 dtype: str, out: str, device: str = "auto", role: str = "evaluation", calibration: str = "") -> dict:
    """Perplexity on one text of `dataset`: `role` 'evaluation' (what is reported) or 'validation' (what settings
    are chosen on). The record names the three texts (data.fingerprints); `calibration` is the calibration source
    of a compressed model ('' for the dense model)."""
    from transformers import AutoTokenizer

    from . import evaluate

    if role not in ("evaluation", "validation"):
        raise GlrsError(f"perplexity role {role!r}: use evaluation or validation")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = data.load_text(dataset, role)
    with gpuslots.device_slot(device) as dev:
        model = load_model(model_path, dtype, dev)
        result = evaluate.perplexity(model, data.tokenize(tokenizer, text), seqlen, max_tokens, dev)
    run = json.loads(Path(info_file).read_text()) if info_file else dense_run_info(model_path)
    record = {**run, "dataset": dataset, "role": role, "split": text.split, "text_sha256": text.fingerprint,
              "texts": data.fingerprints(dataset, calibration), **result}
    cas.write_json_atomic(out, record)
    return record
