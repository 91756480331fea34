"""Activation statistics of the dense model: the input second moment H = X^T X / tokens of every target matrix.

CAP's realisation (glrs.realise) and the OWL-style allocator price an error by what it does to a
matrix's outputs on the calibration inputs, ||(W - W~) X||^2 = tr((W - W~) H (W - W~)^T) * tokens,
so they need H. One job runs the dense model layer by layer over the calibration windows once and
writes one file per decoder layer (`layer_<i>.safetensors`), so that the per-layer realisation jobs
each read only their layer. Matrices that share an input share one H: q/k/v read `attn` (the
attention's input), o reads `o`, gate/up read `mlp`, down reads `down`.

Bounded by design (issue 21). Memory: the model is held in its stored dtype and each decoder layer is
computed in float32 while it runs (as the earlier float32 load did, bit for bit); a layer's float64
accumulators (~2 GB at 8B, 14336^2 for down) are written and dropped before the next layer starts, so
the job holds one layer's statistics, not every layer's (~65 GB at 8B). Disk: STATS_VERSION 2 stores
only H's upper triangle, row-major, in float32 (H is symmetric; n(n+1)/2 instead of n^2 values: 16.4
instead of 32.7 GB at 8B); `read_layer` mirrors it (the one place that knows the format). Resumable:
each layer's file is first written under out_dir/.partial/ (Snakemake deletes an interrupted job's
declared outputs, not that folder), a rerun skips the layers found there with matching metadata, and
the files move to their final names when all are done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import cas
from .errors import GlrsError

STATS_VERSION = 2  # 2: upper triangle only (float32, row-major), layer-streamed collection; 1: full H float32
INPUT_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
PARTIAL = ".partial"


def layer_file(out_dir: str | Path, layer: int) -> Path:
    return Path(out_dir) / f"layer_{layer}.safetensors"


def pack(H: torch.Tensor) -> torch.Tensor:
    """[n, n] -> [n (n + 1) / 2]: the upper triangle, row by row (the lower one is its mirror)."""
    n = H.shape[0]
    return H[torch.ones(n, n, dtype=torch.bool, device=H.device).triu()].contiguous()


def _side(packed: torch.Tensor) -> int:
    length = packed.numel()
    n = int(round(((8 * length + 1) ** 0.5 - 1) / 2))
    if n * (n + 1) // 2 != length:
        raise GlrsError(f"{length} values are no upper triangle of a square matrix")
    return n


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: the symmetric [n, n] matrix, in packed's dtype."""
    n = _side(packed)
    upper = torch.zeros(n, n, dtype=packed.dtype)
    upper[torch.ones(n, n, dtype=torch.bool).triu()] = packed
    return upper + upper.triu(1).T


def packed_diagonal(packed: torch.Tensor) -> torch.Tensor:
    """diag(H) of a packed upper triangle: row i starts at i n - i (i - 1) / 2."""
    n = _side(packed)
    i = torch.arange(n, dtype=torch.int64)
    return packed[i * n - i * (i - 1) // 2]


def collect(model_dir: str, calib_ids: torch.Tensor, layers: list[int], out_dir: str, device: str = "cpu",
            batch_size: int = 4) -> dict:
    """Write H of every target input of the dense model for `layers` into out_dir/layer_<i>.safetensors,
    one layer at a time (see the module docstring: memory, disk, resuming)."""
    from transformers import AutoModelForCausalLM

    from .conditions import current
    from .layers import sequential_layers
    from .modelio import read_manifest

    out_dir = Path(out_dir)
    partial = out_dir / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    meta = {"tokens": int(calib_ids.numel()), "layers": layers, "version": STATS_VERSION,
            "conditions": current(device, "float64")}
    done = {i for i in layers if _matches(layer_file(partial, i), meta, i)}
    if len(done) < len(layers):
        if done:
            print(f"glrs activations: layers {sorted(done)} found in {partial}, collecting the other "
                  f"{len(layers) - len(done)}", flush=True)
        stored = getattr(torch, read_manifest(model_dir).get("dtype", "float32"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=stored).eval()
        model.model.embed_tokens.float()  # the layers' inputs in float32, as from a float32 load

        def record(i, layer, layer_stats):
            groups = {}
            for short, group in INPUT_OF.items():
                st = layer_stats[short]
                if group not in groups:
                    groups[group] = st.H / max(st.tokens, 1)
            write_layer(layer_file(partial, i), groups, meta | {"layer": i})
            return {}

        skip = set(range(len(model.model.layers))) - (set(layers) - done)
        sequential_layers(model, calib_ids, device, record, propagate="dense", batch_size=batch_size,
                          skip=skip, compute_dtype=torch.float32)
    for i in layers:
        os.replace(layer_file(partial, i), layer_file(out_dir, i))
    if not any(partial.iterdir()):
        partial.rmdir()
    return meta


def write_layer(path: str | Path, H: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one layer's file: group (attn, o, mlp, down) -> H [n, n], stored as its float32 upper triangle."""
    missing = sorted(set(INPUT_OF.values()) - set(H))
    if missing:
        raise GlrsError(f"activation statistics lack {missing}")
    groups = {g: pack(h.to(torch.float32)).cpu() for g, h in H.items()}
    with cas.atomic_path(path) as tmp:
        save_file(groups, str(tmp), metadata={"glrs": cas.canonical_json(meta | {"version": STATS_VERSION})})


def _matches(path: Path, meta: dict, layer: int) -> bool:
    """Whether an earlier, interrupted run left a complete file for this layer with the same inputs."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            found = json.loads(f.metadata()["glrs"])
            keys = set(f.keys())
    except Exception:
        return False
    same = {k: found.get(k) for k in ("tokens", "layers", "version", "layer")}
    return same == {k: (meta | {"layer": layer})[k] for k in same} and keys == set(INPUT_OF.values())


def _open_groups(path: str | Path, read):
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            if int(meta.get("version", 1)) != STATS_VERSION:
                raise GlrsError(f"format version {meta.get('version', 1)}, this glrs reads {STATS_VERSION}")
            groups = {g: read(f.get_tensor(g)) for g in f.keys()}
    except Exception as e:
        raise GlrsError(f"cannot read activation statistics {path}: {e}; delete the file and rerun the "
                        "activations job") from e
    missing = sorted(set(INPUT_OF.values()) - set(groups))
    if missing:
        raise GlrsError(f"activation statistics {path} lack {missing}; delete the file and rerun the activations job")
    return {short: groups[g] for short, g in INPUT_OF.items()}


def read_layer(path: str | Path) -> dict[str, torch.Tensor]:
    """short -> H [n, n] float64 for the seven targets of one layer (shared inputs share the tensor)."""
    return _open_groups(path, lambda t: unpack(t.to(torch.float64)))


def read_diagonals(path: str | Path) -> dict[str, torch.Tensor]:
    """short -> diag(H) [n] float64 of one layer, without forming H (what Stage 2's budget policy needs)."""
    return _open_groups(path, lambda t: packed_diagonal(t).to(torch.float64))
