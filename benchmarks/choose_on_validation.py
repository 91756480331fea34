#!/usr/bin/env python
"""Choose one setting on the validation text, never on the evaluation text (docs/design.md section 8).

For each candidate value of one knob (by default CAP's `allocator_params.cap.offset_scale`), run the pipeline
(snakemake) with `evaluation.validation: true` for the compressed models that the knob changes, read their
validation perplexities (and nothing else), print a table and the pick, and write
results/benchmarks/choose_on_validation-<knob>.json: the candidates, their validation perplexities, the pick
and the three text fingerprints (calibration, validation, evaluation). The pick minimises the geometric mean of
the validation perplexity over the runs the knob changes (every density and allocator of the config that it
reaches). Only after the JSON is written, and only with --show-evaluation, is the pick's evaluation perplexity
computed and printed, labelled as such; it is not written to the JSON.

    python benchmarks/choose_on_validation.py --config config/comparison.yaml --cores all \\
        [--knob allocator_params.cap.offset_scale] [--values 0.25 0.5 0.75 1.0] [--directory .] \\
        [--snakemake="--resources gpu=1"] [--show-evaluation] [--out results/benchmarks/...json]

--config is an overlay on config/config.yaml, as snakemake's --configfile is; --directory is the working
directory whose results/ tree the runs use (their cache is shared with any other run there).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from glrs import cas, plan as glrs_plan, progress  # noqa: E402
from glrs.config import DEFAULT_CONFIG, validate  # noqa: E402
from glrs.errors import GlrsError  # noqa: E402

DEFAULT_KNOB = "allocator_params.cap.offset_scale"
DEFAULT_VALUES = ["0.25", "0.5", "0.75", "1.0"]
CRITERION = "geometric mean of the validation perplexity over the runs the knob changes (lower is better)"


def nested(path: str, value) -> dict:
    """{'a': {'b': value}} of 'a.b'."""
    out = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def overlay_of(knob: str, value) -> dict:
    """What a candidate adds to the user's config: the knob's value, and the validation perplexity."""
    from snakemake.utils import update_config

    over = nested(knob, value)
    update_config(over, {"evaluation": {"validation": True}})
    return over


def merged_config(config_file: Path | None, overlay: dict) -> dict:
    """The config snakemake will see: config/config.yaml, then --config's file, then the overlay, merged
    recursively in that order (snakemake.utils.update_config, as snakemake merges --configfile)."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if config_file is not None:
        update_config(cfg, yaml.safe_load(config_file.read_text()) or {})
    update_config(cfg, copy.deepcopy(overlay))
    return validate(cfg)


def plan_in(directory: Path, cfg: dict) -> glrs_plan.Plan:
    """The plan as snakemake makes it in `directory` (relative model and text paths resolve there)."""
    here = Path.cwd()
    os.chdir(directory)
    try:
        return glrs_plan.make_plan(cfg)
    finally:
        os.chdir(here)


def snakemake(directory: Path, config_files: list[Path], cores: str, extra: list[str], targets: list[str],
              log: Path) -> float:
    """One snakemake run for `targets` (one line per finished job, progress.run); its wall seconds."""
    args = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(directory), "--cores", cores,
            "--configfile", *map(str, config_files), *extra, "--", *targets]
    # the jobs run `python -m glrs`: this checkout's, whatever else the interpreter has installed
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        print(f"  snakemake {' '.join(shlex.quote(a) for a in args)}", flush=True)
        rc = progress.run(args, verbose=False, out=_Tee(out))
    if rc:
        raise GlrsError(f"snakemake failed (exit {rc}); its log: {log}, each job's in {directory}/results/logs/")
    return time.monotonic() - t0


class _Tee:
    """progress.run's output to the terminal and to the candidate's log."""

    def __init__(self, log):
        self.log = log

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.log.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False


def read_validation(path: Path) -> dict:
    """A validation perplexity record; anything else is refused (this script never reads an evaluation)."""
    rec = json.loads(path.read_text())
    if rec.get("role") != "validation":
        raise GlrsError(f"{path} is not a validation perplexity (role {rec.get('role')!r}); it is not read to choose")
    return rec


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="config overlay (snakemake --configfile); default: config/config.yaml alone")
    p.add_argument("--knob", default=DEFAULT_KNOB, help=f"dotted config key to choose (default {DEFAULT_KNOB})")
    p.add_argument("--values", nargs="+", default=DEFAULT_VALUES, help="candidate values, read as YAML "
                   f"(default {' '.join(DEFAULT_VALUES)})")
    p.add_argument("--dataset", help="perplexity dataset to choose on (default: the config's first evaluation dataset)")
    p.add_argument("--directory", type=Path, default=Path("."), help="snakemake's working directory (its results/ tree)")
    p.add_argument("--cores", default="all")
    p.add_argument("--snakemake", default="", help="more snakemake arguments, one string (e.g. '--resources gpu=1')")
    p.add_argument("--out", type=Path, help="the JSON (default results/benchmarks/choose_on_validation-<knob>.json "
                   "of this checkout)")
    p.add_argument("--show-evaluation", action="store_true",
                   help="after choosing and writing the JSON, compute and print the pick's evaluation perplexity")
    args = p.parse_args(argv)
    try:
        return choose(args)
    except GlrsError as e:
        print(f"choose_on_validation: error: {e}", file=sys.stderr)
        return 2


def choose(args) -> int:
    t_start = time.monotonic()
    directory = args.directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    config_file = args.config.resolve() if args.config else None
    if config_file is not None and not config_file.is_file():
        raise GlrsError(f"--config {args.config}: no such file")
    values = [yaml.safe_load(v) for v in args.values]
    if len(values) < 2 or len({json.dumps(v) for v in values}) != len(values):
        raise GlrsError(f"--values {args.values}: give at least two different candidates")
    stem = args.knob.split(".")[-1]
    out = args.out or REPO / "results" / "benchmarks" / f"choose_on_validation-{stem}.json"
    workdir = directory / "results" / "choose_on_validation"

    # Plan every candidate first: a knob that changes nothing, or a bad value, stops before any job runs.
    cands = []
    for value in values:
        overlay = overlay_of(args.knob, value)
        plan = plan_in(directory, merged_config(config_file, overlay))
        cands.append({"value": value, "overlay": overlay, "plan": plan})
    dataset = args.dataset or cands[0]["plan"].config["evaluation"]["datasets"][0]
    if dataset not in cands[0]["plan"].val_keys:
        raise GlrsError(f"--dataset {dataset!r} is not among the config's evaluation.datasets "
                        f"{list(cands[0]['plan'].val_keys)}")
    labels = [r.label for r in cands[0]["plan"].runs]
    if any([r.label for r in c["plan"].runs] != labels for c in cands):
        raise GlrsError(f"the candidates of {args.knob} plan different runs; choose a knob that changes settings, not the grid")
    changed = [i for i, label in enumerate(labels) if len({c["plan"].runs[i].comp_key for c in cands}) > 1]
    if not changed:
        raise GlrsError(f"{args.knob} changes no compressed model of this config (e.g. offset_scale needs allocator "
                        "cap with policy budget in `allocators`); nothing to choose")
    print(f"choosing {args.knob} among {values} on the validation text of {dataset}: "
          f"{len(changed)} run(s) per candidate: {', '.join(labels[i] for i in changed)}", flush=True)

    for c in cands:
        plan = c["plan"]
        c["files"] = {labels[i]: plan.metrics_file(plan.runs[i].comp_key, dataset, "validation") for i in changed}
        c["config_file"] = workdir / f"{stem}={c['value']}.yaml"
        cas.write_text_atomic(c["config_file"], yaml.safe_dump(c["overlay"], sort_keys=True))
        files = [config_file, c["config_file"]] if config_file else [c["config_file"]]
        print(f"candidate {args.knob} = {c['value']}", flush=True)
        c["seconds"] = snakemake(directory, files, args.cores, shlex.split(args.snakemake), list(c["files"].values()),
                                 directory / "results" / "logs" / "choose_on_validation" / f"{stem}={c['value']}.log")
        c["records"] = {label: read_validation(directory / f) for label, f in c["files"].items()}
        c["validation_ppl"] = {label: rec["ppl"] for label, rec in c["records"].items()}
        c["criterion"] = geometric_mean(list(c["validation_ppl"].values()))
        print(f"  {args.knob} = {c['value']}: validation perplexity "
              + ", ".join(f"{k} {v:.4f}" for k, v in c["validation_ppl"].items())
              + f"; {c['seconds']:.0f} s", flush=True)

    texts = {json.dumps(rec["texts"], sort_keys=True) for c in cands for rec in c["records"].values()}
    if len(texts) != 1:
        raise GlrsError(f"the candidates' records name different texts: {sorted(texts)}")
    texts = json.loads(texts.pop())
    pick = min(cands, key=lambda c: c["criterion"])  # ties: the first candidate given

    heads = [stem] + [labels[i] for i in changed] + ["geomean"]
    cells = [[str(c["value"])] + [f"{c['validation_ppl'][labels[i]]:.4f}" for i in changed] + [f"{c['criterion']:.4f}"]
             for c in cands]
    widths = [max(len(h), *(len(row[j]) for row in cells)) for j, h in enumerate(heads)]
    print(f"\nvalidation perplexity on {dataset}; the pick minimises the {CRITERION}:")
    print("  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for c, row in zip(cands, cells):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)) + ("  <- pick" if c is pick else ""))
    seconds = time.monotonic() - t_start
    record = {
        "knob": args.knob, "dataset": dataset, "criterion": CRITERION, "pick": pick["value"],
        "candidates": [{"value": c["value"], "validation_ppl": c["validation_ppl"], "criterion": c["criterion"],
                        "metrics_files": c["files"], "seconds": round(c["seconds"], 1)} for c in cands],
        "texts": texts,
        "validation_tokens": sorted({rec["tokens"] for c in cands for rec in c["records"].values()}),
        "config": str(args.config) if args.config else None,
        "model": pick["plan"].config["model"],
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name if sys.argv else "", *sys.argv[1:]]),
        "seconds_total": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    cas.write_json_atomic(out, record)
    print(f"pick: {args.knob} = {pick['value']} (chosen on validation only); wrote {out}")
    print(f"run time: {seconds:.0f} s ({seconds / 60:.1f} min) for {len(cands)} candidates")

    if args.show_evaluation:  # after the choice, and not written to the JSON
        plan = pick["plan"]
        files = {labels[i]: plan.metrics_file(plan.runs[i].comp_key, dataset) for i in changed}
        files_cfg = [config_file, pick["config_file"]] if config_file else [pick["config_file"]]
        snakemake(directory, files_cfg, args.cores, shlex.split(args.snakemake), list(files.values()),
                  directory / "results" / "logs" / "choose_on_validation" / "evaluation-of-pick.log")
        print(f"evaluation perplexity of the pick ({args.knob} = {pick['value']}; reported only, not used to choose):")
        for label, f in files.items():
            rec = json.loads((directory / f).read_text())
            print(f"  {label}: {rec['ppl']:.4f} on {rec['tokens']} tokens of the evaluation text ({rec['text_sha256'][:10]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
