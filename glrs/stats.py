"""Activation statistics of the dense model: the input second moment H = X^T X / tokens of every target matrix.

CAP's realisation (glrs.realise) and the OWL-style allocator price an error by what it does to a
matrix's outputs on the calibration inputs, ||(W - W~) X||^2 = tr((W - W~) H (W - W~)^T) * tokens,
so they need H. One job runs the dense model layer by layer over the calibration windows once and
writes one file per decoder layer (`layer_<i>.safetensors`), so that the per-layer realisation jobs
each read only their layer. Matrices that share an input share one H: q/k/v read `attn` (the
attention's input), o reads `o`, gate/up read `mlp`, down reads `down`. Stored in float32: its
bytes are what the realisation reads; accumulation is float64.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import cas
from .errors import GlrsError

STATS_VERSION = 1
INPUT_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}


def layer_file(out_dir: str | Path, layer: int) -> Path:
    return Path(out_dir) / f"layer_{layer}.safetensors"


def collect(model_dir: str, calib_ids: torch.Tensor, layers: list[int], out_dir: str, device: str = "cpu",
            batch_size: int = 4) -> dict:
    """Write H of every target input of the dense model for `layers` into out_dir/layer_<i>.safetensors."""
    from transformers import AutoModelForCausalLM

    from .methods.base import collect_stats
    from .modelio import weight_name

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stats = collect_stats(model, calib_ids, device, batch_size=batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .conditions import current

    meta = {"tokens": int(calib_ids.numel()), "layers": layers, "version": STATS_VERSION,
            "conditions": current(device, "float64")}
    for i in layers:
        tensors = {}
        for short, group in INPUT_OF.items():
            st = stats[weight_name(i, short)]
            if group not in tensors:
                tensors[group] = (st.H / max(st.tokens, 1)).to("cpu", torch.float32).contiguous()
        with cas.atomic_path(layer_file(out_dir, i)) as tmp:
            save_file(tensors, str(tmp), metadata={"glrs": cas.canonical_json(meta | {"layer": i})})
    return meta


def read_layer(path: str | Path) -> dict[str, torch.Tensor]:
    """short -> H [n, n] float64 for the seven targets of one layer (shared inputs share the tensor)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            json.loads(f.metadata()["glrs"])
            groups = {g: f.get_tensor(g).to(torch.float64) for g in f.keys()}
    except Exception as e:
        raise GlrsError(f"cannot read activation statistics {path}: {e}; delete the file and rerun the "
                        "activations job") from e
    missing = sorted(set(INPUT_OF.values()) - set(groups))
    if missing:
        raise GlrsError(f"activation statistics {path} lack {missing}; delete the file and rerun the activations job")
    return {short: groups[g] for short, g in INPUT_OF.items()}
