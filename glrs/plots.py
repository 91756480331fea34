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
from .stage1 import Stage1  # noqa: E402

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


def _stage1_identity(info: dict) -> tuple:
    """What Stage 1 offered each matrix: allocations with equal identities share one Stage 1."""
    return tuple(sorted((n, m["rank_available"], m["nnz_available"]) for n, m in info["matrices"].items()))


def density_minus(info: dict, ref: dict) -> tuple[np.ndarray, list[int]]:
    """layers x matrices kept density of `info` minus that of `ref` (same Stage 1)."""
    if _stage1_identity(info) != _stage1_identity(ref):
        raise ValueError("the two allocations come from different Stage-1 outputs")
    grid, layers = _grid(info, "density")
    return grid - _grid(ref, "density")[0], layers


def plot_allocation(alloc_jsons: list[str], out: str | Path) -> None:
    """One row per allocation run: heat maps over layer x matrix of kept rank, kept sparse
    entries and total kept density -- the per-layer redundancy the global allocation finds --
    and, where a uniform allocation of the same density on the same Stage 1 exists, the
    difference of kept density from it (red: more than uniform, blue: less)."""
    infos = [json.loads(Path(p).read_text()) for p in alloc_jsons]
    infos.sort(key=lambda i: (i["allocator"], i["target_density"], json.dumps(i.get("allocator_params"), sort_keys=True)))
    uniform = {(i["target_density"], _stage1_identity(i)): i for i in infos if i["allocator"] == "uniform"}
    n = len(infos)
    cols = len(PANELS) + 1
    fig, axes = plt.subplots(n, cols, figsize=(4.2 * cols, 0.9 + 0.13 * _n_layers(infos) * n + 0.6 * n),
                             squeeze=False)
    for row, info in enumerate(infos):
        title = f"{info['allocator']} @ density {info['target_density']}"
        if "epochs" in (info.get("allocator_params") or {}):
            title += f", {info['allocator_params']['epochs']} epochs"
        for col, (field, label) in enumerate(PANELS):
            grid, layers = _grid(info, field)
            _heat(fig, axes[row, col], grid, layers, f"{title}\n{label}", "viridis", 0, max(1e-9, np.nanmax(grid)))
        ax = axes[row, -1]
        ref = uniform.get((info["target_density"], _stage1_identity(info)))
        if ref is None or ref is info:
            ax.axis("off")
            continue
        diff, layers = density_minus(info, ref)
        lim = max(1e-9, float(np.nanmax(np.abs(diff))))
        _heat(fig, axes[row, -1], diff, layers, f"{title}\nkept parameters / (m·n) minus uniform's", "RdBu_r", -lim, lim)
    fig.tight_layout()
    _save(fig, out)


def _heat(fig, ax, grid: np.ndarray, layers: list[int], title: str, cmap: str, vmin: float, vmax: float) -> None:
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(MATRICES)), MATRICES)
    step = max(1, len(layers) // 10)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_ylabel("layer")
    ax.set_xlabel("matrix")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _n_layers(infos: list[dict]) -> int:
    return max(len({m["layer"] for m in i["matrices"].values()}) for i in infos)


def plot_spectra(model_dir: str, stage1: Stage1, out: str | Path) -> None:
    """Singular values of each weight W against those of its low-rank part L, for a few layers:
    RPCA moves the heavy tail of W's spectrum into S, so L's spectrum drops off sooner. `stage1`
    (a glrs.stage1.Stage1) names the layers; under stage1 weights there is no
    L, and the figure shows W's spectra alone."""
    rows = len(stage1.layers)
    fig, axes = plt.subplots(rows, len(MATRICES), figsize=(2.6 * len(MATRICES), 2.3 * rows), squeeze=False)
    for r, layer in enumerate(stage1.layers):
        sigma = {} if stage1.splits_weights else stage1.layer(layer, ("sigma",))[1]
        weights = modelio.read_layer(model_dir, layer)
        for c, short in enumerate(MATRICES):
            ax = axes[r, c]
            w_sv = torch.linalg.svdvals(weights[short].double()).numpy()
            ax.semilogy(np.arange(1, len(w_sv) + 1), w_sv, label="W", lw=1.2)
            if stage1.splits_weights:
                ax.set_title(f"layer {layer} {short}  (no L: stage1 weights)", fontsize=8)
            else:
                l_sv = sigma[f"{short}.sigma"].double().numpy()
                if len(l_sv):
                    ax.semilogy(np.arange(1, len(l_sv) + 1), l_sv, label="L (RPCA)", lw=1.2)
                ax.set_title(f"layer {layer} {short}  rank(L)={len(l_sv)}/{len(w_sv)}", fontsize=8)
            ax.set_xlabel("index k")
            if c == 0:
                ax.set_ylabel("singular value σ_k")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


# ---- results across methods (from results/summary.csv) and stage times (from results/bench) ----------

def _read_summary(summary_csv: str | Path) -> list[dict]:
    import csv

    return list(csv.DictReader(Path(summary_csv).read_text().splitlines()))


def series_label(row: dict, models: set[str], split_variants: set[str] = frozenset()) -> str:
    """'cap/<allocator>' for CAP rows, the method name otherwise (prefixed by the model when several);
    labels in `split_variants` (several variants in one table, e.g. the paper as written beside CAP's
    default) get their variant appended, so that each variant is its own line."""
    label = f"{row['method']}/{row['allocator']}" if row["method"] == "cap" and row.get("allocator") else row["method"]
    if label in split_variants and row.get("variant"):
        label += f" ({row['variant']})"
    return f"{Path(str(row['model'])).name}: {label}" if len(models) > 1 else label


def _labels_with_several_variants(rows: list[dict], models: set[str]) -> set[str]:
    variants: dict[str, set[str]] = {}
    for r in rows:
        if r["method"] != "dense":
            variants.setdefault(series_label(r, models), set()).add(r.get("variant") or "")
    return {label for label, v in variants.items() if len(v) > 1}


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if v != v else v


def _metric_vs_density(rows: list[dict], metric, ylabel: str, title: str, logy: bool, protocol: str = "",
                       ymax: float | None = None, error=None):
    """One line per method (cap: per allocator) of metric(row) against achieved density; the dense
    model as a horizontal dashed line. When the rows hold several evaluation protocols (column
    `protocol` of the summary), each gets its own lines, labelled with it. `ymax` cuts the axis there
    (points above it are drawn on the edge, hollow). `error(row)`: a standard error, drawn as an error
    bar of one standard error each way (the dense model's as a band). Returns the Figure."""
    models = {r["model"] for r in rows}
    split = _labels_with_several_variants(rows, models)
    protocols = {r.get(protocol, "") for r in rows if metric(r) is not None} if protocol else set()

    def tag(r) -> str:
        return f" [{r.get(protocol, '')}]" if len(protocols) > 1 else ""

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    dense: list[tuple[str, float, float | None]] = []
    for r in rows:
        y = metric(r)
        if y is None:
            continue
        e = error(r) if error else None
        if r["method"] == "dense":
            dense.append((Path(str(r["model"])).name + tag(r), y, e))
            continue
        x = _num(r.get("achieved_density")) or _num(r.get("target_density"))
        if x is not None:
            series.setdefault(series_label(r, models, split) + tag(r), []).append((x, y, e))
    colours = plt.get_cmap("tab20").colors  # distinct colours for up to 20 methods / allocators
    for i, label in enumerate(sorted(series)):
        pts = sorted(series[label], key=lambda p: p[:2])
        colour = colours[2 * i % 20 + (2 * i // 20)]
        ys = [p[1] if ymax is None else min(p[1], ymax) for p in pts]
        ax.plot([p[0] for p in pts], ys, marker="o", lw=1.6, label=label, color=colour)
        bars = [(p[0], y, p[2]) for p, y in zip(pts, ys) if p[2] is not None]
        if bars:
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=[b[2] for b in bars], fmt="none",
                        ecolor=colour, elinewidth=1.0, capsize=3)
        cut = [(p[0], ymax) for p in pts if ymax is not None and p[1] > ymax]
        if cut:
            ax.plot(*zip(*cut), ls="none", marker="o", mfc="white", color=colour)
    for model, y, e in dense:
        ax.axhline(y, ls="--", color="black", lw=1.2,
                   label=f"dense ({model})" if len(models) > 1 or len(protocols) > 1 else "dense")
        if e is not None:
            ax.axhspan(y - e, y + e, color="black", alpha=0.08, lw=0)
    if logy:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.6g}")  # 49130, not 4.913x10^4
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        # Label minor ticks only when the axis spans less than a decade (else they overprint).
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    if ymax is not None:
        ax.set_ylim(top=ymax)
        title += f"; axis cut at {ymax:g} (hollow: above)"
    ax.set_xlabel("achieved density (kept parameters / dense parameters of the target layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if len(series) > 8:  # a whole grid: the legend beside the axes, not over the lines
        fig.set_size_inches(10.5, 4.8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif series or dense:
        ax.legend(fontsize=9, loc="best")
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def ppl_vs_density_figure(rows: list[dict], ymax: float | None = None):
    """The evaluation text's perplexity (a validation perplexity, ppl_<dataset>_validation, is for choosing
    settings, not for the figure)."""
    from .summary import VALIDATION

    cols = sorted(c for c in (rows[0] if rows else {}) if c.startswith("ppl_") and not c.endswith(VALIDATION))
    col = cols[0] if cols else "ppl_"
    dataset = col[len("ppl_"):] or "?"

    def metric(r):
        return _num(r.get(col))

    return _metric_vs_density(rows, metric, f"perplexity on {dataset} (log scale; lower is better)",
                              f"Perplexity vs density ({dataset})", logy=True, protocol=f"eval_{dataset}", ymax=ymax)


def zeroshot_vs_density_figure(rows: list[dict]):
    """Mean accuracy over the tasks, with its standard error as error bars (summary.mean_accuracy_stderr)."""
    from .summary import mean_accuracy, mean_accuracy_stderr

    cols = sorted({c for r in rows for c in r if c.startswith("acc_")})

    def metric(r):
        acc = mean_accuracy(r, cols)
        return None if acc is None else 100.0 * acc

    def error(r):
        se = mean_accuracy_stderr(r, cols)
        return None if se is None else 100.0 * se

    tasks = ", ".join(c[len("acc_"):] for c in cols) or "none"
    return _metric_vs_density(rows, metric, "mean zero-shot accuracy (%), bars: \u00b11 standard error",
                              f"Zero-shot accuracy vs density (mean over {tasks})", logy=False, protocol="zeroshot_limit",
                              error=error)


def plot_ppl_vs_density(summary_csv: str | Path, out: str | Path, ymax: float | None = None) -> None:
    _save(ppl_vs_density_figure(_read_summary(summary_csv), ymax), out)


def plot_zeroshot_vs_density(summary_csv: str | Path, out: str | Path) -> None:
    _save(zeroshot_vs_density_figure(_read_summary(summary_csv)), out)


def stage_seconds(bench_dir: str | Path) -> dict[str, tuple[float, int]]:
    """rule -> (summed wall seconds, job count) over Snakemake's benchmark TSVs under bench_dir/<rule>/."""
    import csv

    out: dict[str, tuple[float, int]] = {}
    bench_dir = Path(bench_dir)
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        rule = tsv.relative_to(bench_dir).parts[0]
        rows = list(csv.DictReader(tsv.read_text().splitlines(), delimiter="\t"))
        if not rows or _num(rows[-1].get("s")) is None:
            continue
        secs, n = out.get(rule, (0.0, 0))
        out[rule] = (secs + float(rows[-1]["s"]), n + 1)
    return out


def stage_times_figure(times: dict[str, tuple[float, int]]):
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.45 * max(1, len(times))))
    rules = sorted(times, key=lambda r: times[r][0])
    secs = [times[r][0] for r in rules]
    ax.barh(range(len(rules)), secs, color="tab:blue")
    ax.set_yticks(range(len(rules)), rules)
    for i, r in enumerate(rules):
        ax.text(secs[i], i, f" {secs[i]:.1f} s ({times[r][1]} job{'s' if times[r][1] != 1 else ''})", va="center", fontsize=9)
    ax.set_xlabel("wall time, summed over the rule's jobs (s)")
    ax.set_ylabel("rule")
    ax.set_title("Stage wall times (Snakemake benchmarks)")
    if secs:
        ax.set_xlim(0, max(secs) * 1.35 or 1)
    else:
        ax.text(0.5, 0.5, "no benchmark files yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_stage_times(bench_dir: str | Path, out: str | Path) -> None:
    _save(stage_times_figure(stage_seconds(bench_dir)), out)
