"""Stage 1 as its consumers read it: every layer's candidates, from the decompose files or from the weights.

A Stage-1 layer is, per target matrix, L's factors (`<m>.U`, `<m>.sigma`, `<m>.V`) and the nonzeros
of S sorted by |value| descending (`<m>.S_values`, flat `<m>.S_index`), with metadata naming each
matrix and its shape: what a `glrs decompose` job stores (glrs.pipeline.decompose_layer). Allocation,
materialisation, CAP's candidates and the spectra plot read these through a `Stage1`, which finds them

- in the decompose jobs' files, one per layer (`stage1: rpca`), or
- under `stage1: weights` (the default), in the prepared model itself: the split is the trivial L = 0, S = W
  (glrs.rpca.no_split), made in memory by the consumer from `modelio.read_layer`, so the run has no
  decompose job and writes nothing under results/rpca/. Storing it would cost ~9 bytes per weight
  (a sorted copy of every weight and its int64 index: 1.2 GB for the 135M default model, ~70 GB
  for an 8B one) to save a sort.

Both give the same tensors, bit for bit (`layer_tensors` is the one code that forms them, for the
files and for the in-memory split; tests/unit/test_stage1.py), so an allocation or a compressed model
does not depend on which one was read. Both carry the same keys (model, Stage-1 key, layers): an
allocation records them as its inputs either way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open

from . import modelio, rpca
from .errors import GlrsError

WEIGHTS_VERSION = 1  # the key of `stage1: weights` (the split is glrs.rpca.no_split: L = 0, S = W)

PARTS = ("U", "sigma", "V", "S_values", "S_index")


def layer_tensors(short: str, res: rpca.RPCAResult, store: torch.dtype) -> dict[str, torch.Tensor]:
    """What Stage 1 keeps of one matrix's split, as a decompose file stores it: L's factors and S's
    nonzeros sorted by |value| descending with their flat indices, in the weight's dtype `store`."""
    values, index = rpca.sort_sparse(res.S)
    return {
        f"{short}.U": res.U.to("cpu", store).contiguous(),
        f"{short}.sigma": res.sigma.to("cpu", store).contiguous(),
        f"{short}.V": res.V.to("cpu", store).contiguous(),
        f"{short}.S_values": values.to("cpu", store).contiguous(),
        f"{short}.S_index": index.to("cpu", torch.int64).contiguous(),
    }


def split_weights(model_dir: str | Path, layer: int, parts: Sequence[str] = PARTS) -> tuple[dict, dict[str, torch.Tensor]]:
    """`stage1: weights` of one layer, in memory: the metadata and tensors (only `parts` of each
    matrix) that a decompose job would have stored for it. The matrices come in the order a decompose
    file's metadata lists them (canonical JSON: sorted), so every consumer sees the same order."""
    weights = modelio.read_layer(model_dir, layer)
    matrices, tensors = {}, {}
    for short in sorted(weights):
        W = weights[short]
        matrices[short] = {"name": modelio.weight_name(layer, short), "shape": list(W.shape)}
        full = layer_tensors(short, rpca.no_split(W), W.dtype)
        tensors |= {f"{short}.{p}": full[f"{short}.{p}"] for p in parts}
    return {"layer": layer, "matrices": matrices}, tensors


def read_rpca_layer(path: str | Path, parts: Sequence[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A decompose file's metadata and tensors (every tensor, or only `parts` of each matrix)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            keys = list(f.keys()) if parts is None else [f"{s}.{p}" for s in meta["matrices"] for p in parts]
            return meta, {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise GlrsError(f"cannot read RPCA factors {path}: {e}; delete the file and rerun its decompose job") from e


def _layer_of(path: Path) -> int:
    """A decompose file's layer: from its name layer_<i>.safetensors, else from its metadata."""
    index = path.stem.removeprefix("layer_")
    if index.isdigit():
        return int(index)
    return int(read_rpca_layer(path, parts=())[0]["layer"])


@dataclass
class MatrixPool:
    """The candidates Stage 1 left for one matrix: its singular values and sorted |S| (under stage1
    weights: no singular values, and every weight's |value|)."""

    name: str
    layer: int
    short: str
    shape: tuple[int, int]
    sigma: torch.Tensor  # [R], descending
    s_abs: torch.Tensor  # [K], descending

    @property
    def dense(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        return self.shape[0] + self.shape[1]

    @property
    def capacity(self) -> int:
        return self.sigma.numel() * self.rank_cost + self.s_abs.numel()


@dataclass(frozen=True)
class Stage1:
    """Where every layer's Stage-1 candidates come from: `files` (one decompose file per layer, in
    the order of `layers`), or, when there are none, the weights of `model_dir` split as L = 0, S = W."""

    model_key: str
    stage1_key: str
    layers: tuple[int, ...]
    files: tuple[str, ...] = ()
    model_dir: str = ""

    @classmethod
    def from_files(cls, files: Sequence[str | Path]) -> "Stage1":
        """The decompose files results/rpca/<model_key>/<stage1_key>/layer_<i>.safetensors (the keys are the path's)."""
        if not files:
            raise GlrsError("no Stage-1 files given: pass every layer's RPCA file")
        paths = [Path(f) for f in files]
        return cls(paths[0].parent.parent.name, paths[0].parent.name, tuple(map(_layer_of, paths)), tuple(map(str, paths)))

    @classmethod
    def from_weights(cls, model_dir: str | Path, layers: Sequence[int], stage1_key: str = "") -> "Stage1":
        """`stage1: weights`: these layers of the prepared model results/model/<model_key>, split in memory;
        `stage1_key` is the plan's Stage-1 key (what an allocation records as its input)."""
        if not layers:
            raise GlrsError("no layers given to split")
        return cls(Path(model_dir).name, stage1_key, tuple(int(i) for i in layers), (), str(model_dir))

    @property
    def splits_weights(self) -> bool:
        return not self.files

    def keys(self) -> dict:
        """Where the candidates live as keys under the results tree (an allocation's recorded inputs), and
        which source they came from (`stage1`: "files" or "weights", so that `glrs verify` reads the same)."""
        return {"model_key": self.model_key, "stage1_key": self.stage1_key, "layers": list(self.layers),
                "stage1": "weights" if self.splits_weights else "files"}

    def source(self, layer: int) -> str:
        """The file of one layer, or the model it is split from (for messages)."""
        return self.files[self.layers.index(layer)] if self.files else f"{self.model_dir} (layer {layer}, stage1 weights)"

    def check_readable(self) -> None:
        """A truncated or damaged input becomes a GlrsError naming it and its fix before any work."""
        if self.splits_weights:
            modelio.read_manifest(self.model_dir)
            return
        for path in self.files:
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception as e:
                raise GlrsError(f"cannot read RPCA factors {path}: {e}; delete the file and rerun its decompose job") from e

    def layer(self, layer: int, parts: Sequence[str] | None = PARTS) -> tuple[dict, dict[str, torch.Tensor]]:
        """One layer's metadata ({"layer", "matrices": {short: {"name", "shape", ...}}}) and its tensors
        "<short>.<part>" for `parts` (None: every tensor its file holds)."""
        if self.splits_weights:
            return split_weights(self.model_dir, layer, PARTS if parts is None else parts)
        return read_rpca_layer(self.source(layer), parts)

    def read(self, parts: Sequence[str] | None = PARTS) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """Every layer in turn, one in memory at a time."""
        for layer in self.layers:
            yield self.layer(layer, parts)

    def pools(self, values: bool = True) -> list:
        """The allocators' view (MatrixPool): per matrix its singular values and sorted |S|.

        `values=False`, under stage1 weights: only the candidates' counts (no singular component; one
        entry per weight), as 'meta' tensors that hold no data, read from the checkpoint's headers. The
        allocators that decide per-matrix budgets (uniform, owl, CAP's budget policy) need nothing more;
        sorting every |weight| in float64 would cost ~56 GB and minutes at 8B. Reading a value of such a
        pool fails loudly (a meta tensor has none)."""
        pools = []
        if not values and self.splits_weights:
            for layer in self.layers:
                for short, shape in sorted(modelio.layer_shapes(self.model_dir, layer).items()):
                    pools.append(MatrixPool(modelio.weight_name(layer, short), layer, short, tuple(shape),
                                            torch.empty(0, dtype=torch.float64),
                                            torch.empty(shape[0] * shape[1], dtype=torch.float64, device="meta")))
            return pools
        for meta, t in self.read(("sigma", "S_values")):
            for short, info in meta["matrices"].items():
                pools.append(MatrixPool(info["name"], meta["layer"], short, tuple(info["shape"]),
                                        t[f"{short}.sigma"].double(), t[f"{short}.S_values"].double().abs()))
        return pools
