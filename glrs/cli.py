"""`glrs <subcommand>`: the entry points the Snakemake rules call, and a few for people."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GlrsError


def _json(text: str) -> dict:
    return json.loads(text)


def _add_stage1(s: argparse.ArgumentParser) -> None:
    """Where a consumer of Stage 1 finds every layer's candidates (glrs.stage1): its files, or the weights."""
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--rpca", nargs="+", help="Stage 1's files, one per layer (the decompose jobs' outputs)")
    g.add_argument("--split-layers", type=int, nargs="+", metavar="LAYER",
                   help="stage1 weights: no Stage-1 files; these layers of --model-dir are split in memory (L = 0, S = W)")
    s.add_argument("--stage1-key", default="", help="with --split-layers: the plan's Stage-1 key, recorded as an input")


def _stage1(args: argparse.Namespace):
    from .stage1 import Stage1

    if args.rpca:
        return Stage1.from_files(args.rpca)
    if not args.model_dir:
        raise GlrsError("--split-layers splits the weights of --model-dir; pass --model-dir")
    return Stage1.from_weights(args.model_dir, args.split_layers, args.stage1_key)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glrs", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare-model", help="convert a model spec into a safetensors checkpoint")
    s.add_argument("--spec", required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--revision", default="main")
    s.add_argument("--out", required=True)

    s = sub.add_parser("decompose", help="Stage 1: RPCA of one layer")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--params", type=_json, required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); the RPCA solve itself always runs at the fixed "
                        "glrs.conditions.SOLVER_THREADS, so the output's bytes do not depend on this")
    s.add_argument("--out", required=True)

    s = sub.add_parser("calibrate", help="draw calibration token windows")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--params", type=_json, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True)

    s = sub.add_parser("allocate", help="Stage 2: choose kept components and entries under the budget")
    _add_stage1(s)
    s.add_argument("--allocator", required=True)
    s.add_argument("--density", type=float, required=True)
    s.add_argument("--params", type=_json, default={})
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--model-dir")
    s.add_argument("--calib")
    s.add_argument("--stats", nargs="+", help="activation statistics per layer (allocators that need them: owl)")
    s.add_argument("--device", default="auto")
    s.add_argument("--json-out", required=True)
    s.add_argument("--masks-out", help="also write the per-candidate keep-masks (realise.mode select reads them)")

    s = sub.add_parser("materialise", help="write the compressed model (compact format) from the kept Stage-1 candidates")
    s.add_argument("--model-dir", required=True)
    _add_stage1(s)
    s.add_argument("--masks", help="the allocation's keep-masks (needed where it did not keep prefixes)")
    s.add_argument("--alloc-json", required=True)
    s.add_argument("--run-info", type=_json, default={})
    s.add_argument("--out", required=True)
    s.add_argument("--export", default="none", choices=("none", "dense"), help="dense: also write a plain HF checkpoint under hf/")

    s = sub.add_parser("activations", help="input second moments of every target of the dense model, one file per layer")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--calib", required=True)
    s.add_argument("--layers", type=int, nargs="+", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--out-dir", required=True)

    s = sub.add_parser("realise", help="realise one layer at the allocation's budgets: refitted low-rank + sparse (refit), or "
                        "pruned by Wanda's or SparseGPT's rule (wanda, sparsegpt)")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--stats", required=True)
    s.add_argument("--alloc-json", required=True)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--params", type=_json, default={})
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)

    s = sub.add_parser("materialise-realised", help="write the compressed model from the per-layer realisation files")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--realised", nargs="+", required=True)
    s.add_argument("--alloc-json", required=True)
    s.add_argument("--run-info", type=_json, default={})
    s.add_argument("--out", required=True)
    s.add_argument("--export", default="none", choices=("none", "dense"), help="dense: also write a plain HF checkpoint under hf/")

    s = sub.add_parser("compress", help="run a baseline method (glrs.methods) at a target density")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--calib", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--density", type=float, required=True)
    s.add_argument("--params", type=_json, default={})
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--run-info", type=_json, default={})
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--export", default="none", choices=("none", "dense"), help="dense: also write a plain HF checkpoint under hf/")

    s = sub.add_parser("evaluate-ppl", help="perplexity of a model directory (a compressed one as it loads: glrs.load)")
    s.add_argument("--model", required=True)
    s.add_argument("--info", help="info.json of a compressed model")
    s.add_argument("--dataset", required=True)
    s.add_argument("--role", default="evaluation", choices=("evaluation", "validation"),
                   help="which text of the dataset: evaluation (reported) or validation (settings are chosen on it)")
    s.add_argument("--calibration-dataset", default="",
                   help="the calibration source of a compressed model, whose text the record names ('' for dense)")
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)

    s = sub.add_parser("evaluate-zeroshot", help="lm-eval zero-shot accuracy of a model directory")
    s.add_argument("--model", required=True)
    s.add_argument("--info", help="info.json of a compressed model")
    s.add_argument("--tasks", nargs="+", required=True)
    s.add_argument("--limit", type=int, help="examples per task (default: all)")
    s.add_argument("--calibration-dataset", default="",
                   help="the calibration source of a compressed model, whose text the record names ('' for dense)")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)

    s = sub.add_parser("summarise", help="gather every metrics file under the results tree into summary.csv")
    s.add_argument("--results", default="results")
    s.add_argument("--out", required=True)

    s = sub.add_parser("verify", help="recompute a sample of every kind of cached output and compare: bit for bit "
                                      "under the recorded conditions, numerically where a condition differs")
    s.add_argument("--results", default="results")
    s.add_argument("--sample", type=int, default=2, help="outputs recomputed per kind")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kinds", nargs="+", default=["rpca", "calib", "stats", "alloc", "realise", "compressed"],
                   help="which kinds of output to check (default: all)")
    s.add_argument("--threads", type=int, default=0,
                   help="CPU threads of this process (0: torch's default); each recomputation runs at the "
                        "thread count its output recorded")

    s = sub.add_parser("summary", help="print summary.csv: a compact table (120 columns), every column (--wide) or CSV (--csv)")
    s.add_argument("csv", nargs="?", default="results/summary.csv")
    s.add_argument("--wide", action="store_true", help="every column of summary.csv (with --csv: as CSV)")
    s.add_argument("--csv", dest="as_csv", action="store_true",
                   help="CSV for scripts: the compact columns at full precision (with --wide: every column)")
    s.add_argument("--width", type=int, default=120, help="the compact table's width in characters (default 120)")

    s = sub.add_parser("plot-allocation", help="heat maps of kept rank and kept sparse entries per layer x matrix")
    s.add_argument("--alloc-json", nargs="+", required=True)
    s.add_argument("--out", required=True)

    s = sub.add_parser("plot-spectra", help="singular values of W versus L for a few layers (W alone under stage1 weights)")
    s.add_argument("--model-dir", required=True)
    _add_stage1(s)
    s.add_argument("--out", required=True)

    for name, what in (("plot-ppl", "perplexity vs density"), ("plot-zeroshot", "mean zero-shot accuracy vs density")):
        s = sub.add_parser(name, help=f"{what}, one line per method, from summary.csv")
        s.add_argument("--summary", required=True)
        s.add_argument("--out", required=True)
        if name == "plot-ppl":
            s.add_argument("--ymax", type=float, help="cut the perplexity axis here (diverged methods drawn on the edge)")

    s = sub.add_parser("plot-stage-times", help="wall time per rule from Snakemake's benchmark files")
    s.add_argument("--bench", default="results/bench")
    s.add_argument("--out", required=True)

    s = sub.add_parser("versions", help="software versions (CSV) and the effective config (YAML) for the report")
    s.add_argument("--config-json", type=_json, required=True)
    s.add_argument("--csv-out", required=True)
    s.add_argument("--config-out", required=True)
    return p


def run(args: argparse.Namespace) -> None:
    from . import pipeline

    c = args.command
    if c == "prepare-model":
        from .modelio import prepare_model

        prepare_model(args.spec, args.out, args.dtype, args.revision)
    elif c == "decompose":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        meta = pipeline.decompose_layer(args.model_dir, args.layer, args.params, args.out, args.device)
        for short, m in meta["matrices"].items():
            print(f"layer {args.layer} {short}: rank {m['rank']}, nnz {m['nnz']}, {m['iterations']} it, residual {m['residual']:.2e}")
    elif c == "calibrate":
        pipeline.calibrate(args.model_dir, args.params, args.seed, args.out)
    elif c == "allocate":
        if args.split_layers and not args.stage1_key:
            raise GlrsError("--split-layers needs --stage1-key (the Stage-1 key the allocation records as its input)")
        info = pipeline.run_allocator(_stage1(args), args.allocator, args.density, args.params, args.seed, args.model_dir,
                                      args.calib, args.json_out, args.masks_out, args.device, args.stats)
        print(f"{args.allocator}: target density {info['target_density']}, achieved {info['achieved_density']:.5f}")
    elif c == "materialise":
        if args.masks:
            pipeline.check_readable(args.masks, "allocation masks", "delete it and its .json and rerun its allocate job")
        pipeline.materialise(args.model_dir, _stage1(args), args.masks, args.alloc_json, args.run_info, args.out, args.export)
    elif c == "activations":
        pipeline.collect_activations(args.model_dir, args.calib, args.layers, args.out_dir, args.device)
    elif c == "realise":
        from . import gpuslots, realise

        with gpuslots.device_slot(args.device) as dev:
            meta = realise.realise_layer(args.model_dir, args.stats, args.alloc_json, args.layer, args.params, args.out, dev)
        after = {"wanda": "(no update)", "sparsegpt": "after the OBS update"}.get(meta["params"]["mode"], "after the refit")
        for short, m in meta["matrices"].items():
            print(f"layer {args.layer} {short}: rank {m['rank']}, nnz {m['nnz']}, output error "
                  f"{m['error_before_refit']:.4g} -> {m['error']:.4g} {after}")
    elif c == "materialise-realised":
        pipeline.materialise_realised(args.model_dir, args.realised, args.alloc_json, args.run_info, args.out, args.export)
    elif c == "compress":
        info = pipeline.compress_baseline(args.model_dir, args.calib, args.method, args.density, args.params, args.seed,
                                          args.run_info, args.out, args.device, args.export)
        print(f"{args.method}: target density {args.density}, achieved {info['achieved_density']:.5f}")
    elif c == "evaluate-ppl":
        rec = pipeline.evaluate_ppl(args.model, args.info, args.dataset, args.seqlen, args.max_tokens, args.dtype,
                                    args.out, args.device, args.role, args.calibration_dataset)
        print(f"ppl[{args.dataset}, {args.role}] = {rec['ppl']:.4f} over {rec['tokens']} tokens")
    elif c == "evaluate-zeroshot":
        rec = evaluate_zeroshot(args.model, args.info, args.tasks, args.limit, args.dtype, args.device, args.seed, args.out,
                                args.calibration_dataset)
        for task, acc in rec["accuracy"].items():
            se = rec["stderr"].get(task)
            print(f"acc[{task}] = {acc:.4f}" + ("" if se is None else f" +- {se:.4f}"))
    elif c == "summarise":
        from .summary import write_summary

        write_summary(args.results, args.out)
    elif c == "verify":
        from .verify import verify

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        def show(r: dict) -> None:
            print(f"{r['status']:<10} {r['kind']:<10} {r['file']}" + (f"  ({r['detail']})" if r["detail"] else ""))
            if r["conditions_differ"] and r["status"] in ("close", "DIFFERENT"):
                print(f"{'':21} conditions differ: {'; '.join(r['conditions_differ'])}; compared numerically: "
                      f"{r['tolerance']}")
            sys.stdout.flush()

        report = verify(args.results, args.sample, args.seed, args.kinds, on_result=show)
        counts = {s: sum(r["status"] == s for r in report) for s in ("identical", "close", "DIFFERENT", "skipped")}
        print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
        if counts["DIFFERENT"]:
            raise GlrsError("recomputed outputs differ from the cached ones: the run is not reproducible")
        if not counts["identical"] + counts["close"]:
            raise GlrsError("no cached output could be recomputed (their inputs are gone)")
    elif c == "summary":
        from .summary import print_summary

        print_summary(args.csv, wide=args.wide, as_csv=args.as_csv, width=args.width)
    elif c == "plot-allocation":
        from .plots import plot_allocation

        plot_allocation(args.alloc_json, args.out)
    elif c == "plot-spectra":
        from .plots import plot_spectra

        plot_spectra(args.model_dir, _stage1(args), args.out)
    elif c == "plot-ppl":
        from .plots import plot_ppl_vs_density

        plot_ppl_vs_density(args.summary, args.out, args.ymax)
    elif c == "plot-zeroshot":
        from .plots import plot_zeroshot_vs_density

        plot_zeroshot_vs_density(args.summary, args.out)
    elif c == "plot-stage-times":
        from .plots import plot_stage_times

        plot_stage_times(args.bench, args.out)
    elif c == "versions":
        from .summary import write_versions

        write_versions(args.config_json, args.csv_out, args.config_out)


def evaluate_zeroshot(model: str, info_file: str | None, tasks: list[str], limit: int | None, dtype: str,
                      device: str, seed: int, out: str, calibration: str = "") -> dict:
    """glrs.zeroshot.run_zeroshot under a GPU slot; the record carries the same run fields as the
    perplexity records (the compressed model's info.json, or pipeline.dense_run_info), kind 'zeroshot',
    accuracy {task: acc}, lm-eval's standard error of each {task: acc_stderr} and the texts (glrs.data.fingerprints:
    the calibration text, and the source of the offline tasks, which are cut from its evaluation text)."""
    import tempfile
    from pathlib import Path

    from . import gpuslots, zeroshot

    with tempfile.TemporaryDirectory(prefix="glrs-zs-") as tmp:
        with gpuslots.device_slot(device) as dev:
            rec = zeroshot.run_zeroshot(model, tasks, str(Path(tmp) / "zs.json"), dev, limit, seed, dtype=dtype)
    return write_zeroshot_record(rec, info_file, model, tasks, out, calibration)


def write_zeroshot_record(rec: dict, info_file: str | None, model: str, tasks: list[str], out: str,
                          calibration: str = "") -> dict:
    """The pipeline's zero-shot record from run_zeroshot's: the run fields, accuracy and stderr per task, texts."""
    from pathlib import Path

    from . import cas, data, pipeline

    run_info = json.loads(Path(info_file).read_text()) if info_file else pipeline.dense_run_info(model)
    rec = dict(rec)
    rec["zeroshot_seed"] = rec.pop("seed")
    source = (rec.get("offline_tasks") or {}).get("dataset")
    texts = data.fingerprints(source, calibration) if source else {
        "calibration": data.text_identity(calibration, "calibration") if calibration else None}
    record = {**rec, **run_info, "kind": "zeroshot", "accuracy": {t: rec["acc"][t] for t in tasks},
              "stderr": {t: rec["results"][t].get("acc_stderr") for t in tasks}, "texts": texts}
    cas.write_json_atomic(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except GlrsError as e:
        print(f"glrs {args.command}: error: {e}", file=sys.stderr)
        return 2
    _report_peak_gpu_memory(args.command)
    return 0


def _report_peak_gpu_memory(command: str) -> None:
    """One line in the job's log with the GPU memory the job peaked at (scale runs collect it: issue 12)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        print(f"glrs {command}: peak GPU memory {peak} bytes (torch.cuda.max_memory_allocated)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
