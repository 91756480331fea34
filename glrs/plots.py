"""Figures: where the allocation put the budget, and what RPCA did to the spectra.

Headless (Agg backend); every figure has labelled axes and units, and is
written atomically so an interrupted plot never leaves a half-written PNG.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import cas, modelio  # noqa: E402

MATRICES = list(modelio.TARGETS)
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})


def _save(fig, out: str | Path) -> None:
    with cas.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def _grid(info: dict, field: str) -> tuple[np.ndarray, list[int]]:
    """layers x matrices array of a per-matrix field (NaN where a matrix is not compressed)."""
    mats = info["matrices"].values()
    layers = sorted({m["layer"] for m in mats})
    grid = np.full((len(layers), len(MATRICES)), np.nan)
    for m in mats:
        grid[layers.index(m["layer"]), MATRICES.index(m["matrix"])] = field_value(m, field)
    return grid, layers


def field_value(m: dict, field: str) -> float:
    rows, cols = m["shape"]
    if field == "rank_share":  # kept rank as a fraction of the full rank min(m, n)
        return m["rank"] / min(rows, cols)
    if field == "sparse_density":  # kept sparse entries as a fraction of the m*n entries
        return m["nnz"] / (rows * cols)
    if field == "density":
        return (m["rank"] * (rows + cols) + m["nnz"]) / (rows * cols)
    raise ValueError(field)


PANELS = [("rank_share", "kept rank / min(m, n)"), ("sparse_density", "kept sparse entries / (m·n)"),
          ("density", "kept parameters / (m·n)")]


def plot_allocation(alloc_jsons: list[str], out: str | Path) -> None:
    """One row per allocation run: heat maps over layer x matrix of kept rank, kept sparse
    entries and total kept density — the per-layer redundancy the global allocation finds."""
    infos = [json.loads(Path(p).read_text()) for p in alloc_jsons]
    infos.sort(key=lambda i: (i["allocator"], i["target_density"]))
    n = len(infos)
    fig, axes = plt.subplots(n, len(PANELS), figsize=(4.2 * len(PANELS), 0.9 + 0.13 * _n_layers(infos) * n + 0.6 * n),
                             squeeze=False)
    for row, info in enumerate(infos):
        for col, (field, label) in enumerate(PANELS):
            ax = axes[row, col]
            grid, layers = _grid(info, field)
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(grid)),
                           interpolation="nearest")
            ax.set_xticks(range(len(MATRICES)), MATRICES)
            step = max(1, len(layers) // 10)
            ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
            ax.set_ylabel("layer")
            ax.set_xlabel("matrix")
            ax.set_title(f"{info['allocator']} @ density {info['target_density']}\n{label}")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    _save(fig, out)


def _n_layers(infos: list[dict]) -> int:
    return max(len({m["layer"] for m in i["matrices"].values()}) for i in infos)


def plot_spectra(model_dir: str, rpca_files: list[str], out: str | Path) -> None:
    """Singular values of each weight W against those of its low-rank part L, for a few layers:
    RPCA moves the heavy tail of W's spectrum into S, so L's spectrum drops off sooner."""
    from .pipeline import read_rpca_layer

    rows = len(rpca_files)
    fig, axes = plt.subplots(rows, len(MATRICES), figsize=(2.6 * len(MATRICES), 2.3 * rows), squeeze=False)
    for r, path in enumerate(rpca_files):
        meta, tensors = read_rpca_layer(path)
        weights = modelio.read_layer(model_dir, meta["layer"])
        for c, short in enumerate(MATRICES):
            ax = axes[r, c]
            w_sv = torch.linalg.svdvals(weights[short].double()).numpy()
            l_sv = tensors[f"{short}.sigma"].double().numpy()
            ax.semilogy(np.arange(1, len(w_sv) + 1), w_sv, label="W", lw=1.2)
            if len(l_sv):
                ax.semilogy(np.arange(1, len(l_sv) + 1), l_sv, label="L (RPCA)", lw=1.2)
            ax.set_title(f"layer {meta['layer']} {short}  rank(L)={len(l_sv)}/{len(w_sv)}", fontsize=8)
            ax.set_xlabel("index k")
            if c == 0:
                ax.set_ylabel("singular value σ_k")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
