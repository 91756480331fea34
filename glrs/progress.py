"""Run Snakemake with one line per finished job instead of its full log (`make demo`).

    python -m glrs.progress [--verbose] -- --cores all [any other snakemake arguments]

Snakemake's own log (every job's inputs, outputs, reason and resources) stays in .snakemake/log/, and each
job's output in results/logs/; this prints what the job was (for a result: its method, allocator and density,
read back from the JSON it wrote), how long it took and how far the run is. On a terminal a status line shows
the jobs running now and for how long. When a job fails, Snakemake's error block and the end of the job's log
are printed. `--verbose` (`VERBOSE=1 make demo`) runs Snakemake untouched, with its whole log.
"""
from __future__ import annotations

import argparse
import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

RULE = re.compile(r"^(?:local)?rule (\w+):\s*$")
FIELD = re.compile(r"^\s+(\w+): (.*)$")
FINISHED = re.compile(r"^Finished job(?:id)?:? (\d+)")  # 'Finished jobid: 3 (Rule: x)' (9.x), 'Finished job 3.' (8.x)
STEPS = re.compile(r"^(\d+) of (\d+) steps")
ERROR = re.compile(r"^Error in rule (\w+):")
LOG = re.compile(r"^Complete log\(s\): (.*)$")
HEX_KEY = re.compile(r"-?\b[0-9a-f]{8,}\b")


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else clock(seconds)


def _record(path: str, workdir: Path) -> dict | None:
    """The JSON record a job wrote (a metrics or allocation file, or a compressed model's info.json)."""
    p = workdir / path
    if p.is_dir():
        p = p / "info.json"
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def describe(job: dict, workdir: Path = Path(".")) -> str:
    """What a job was, for a person: for a job that wrote a result record, the run it belongs to
    (method/allocator density) and what it measured; otherwise its wildcards without content keys."""
    for out in (o.strip() for o in job.get("output", "").split(",")):
        rec = _record(out, workdir) if out else None
        if not rec:
            continue
        method = rec.get("method") or ("cap" if rec.get("allocator") else "")
        run = "/".join(x for x in (method, rec.get("allocator")) if x)
        if run and run != "dense" and rec.get("target_density") not in (None, ""):
            run += f" {rec['target_density']}"
        parts = [run]
        if isinstance(rec.get("ppl"), (int, float)):
            role = "validation " if rec.get("role") == "validation" else ""
            parts.append(f"{rec.get('dataset', '')} {role}perplexity {rec['ppl']:.2f}".strip())
        elif isinstance(rec.get("accuracy"), dict) and rec["accuracy"]:
            accs = list(rec["accuracy"].values())
            parts.append(f"zero-shot accuracy {100 * sum(accs) / len(accs):.1f} %")
        elif isinstance(rec.get("achieved_density"), (int, float)) and run:
            parts.append(f"achieved density {rec['achieved_density']:.4f}")
        return ", ".join(p for p in parts if p)
    parts = []
    for item in filter(None, (w.strip() for w in job.get("wildcards", "").split(","))):
        name, _, value = item.partition("=")
        value = HEX_KEY.sub("", value).strip("-")
        if value:
            parts.append(f"{name} {value}")
    return ", ".join(parts)


class Progress:
    """Turns Snakemake's log, line by line, into one line per finished job."""

    def __init__(self, out=sys.stdout, live: bool = False, workdir: str | Path = "."):
        self.out, self.live, self.workdir = out, live, Path(workdir)
        self.t0 = time.monotonic()
        self.jobs: dict[str, dict] = {}  # jobid -> rule, fields, start
        self.running: dict[str, dict] = {}
        self.block: dict | None = None  # the job whose fields are being read
        self.stats: list[str] | None = None
        self.finished: dict | None = None
        self.done = self.total = 0
        self.error: list[str] | None = None
        self.errors: list[list[str]] = []
        self.log_path: str | None = None
        self.nothing = False
        self.tail: deque[str] = deque(maxlen=40)
        self.status_width = 0

    # -- output
    def _clear_status(self) -> None:
        if self.live and self.status_width:
            self.out.write("\r" + " " * self.status_width + "\r")
            self.status_width = 0

    def emit(self, line: str) -> None:
        self._clear_status()
        self.out.write(line + "\n")
        self.out.flush()

    def status(self) -> None:
        """The live line (terminals only): the jobs running now and how long each has run."""
        if not self.live or not self.running:
            return
        now = time.monotonic()
        jobs = ", ".join(f"{j['rule']}{' ' + d if (d := describe(j, self.workdir)) else ''} {clock(now - j['start'])}"
                         for j in self.running.values())
        line = f"  {clock(now - self.t0)} running: {jobs}"[:119]
        self._clear_status()
        self.out.write(line)
        self.out.flush()
        self.status_width = len(line)

    # -- parsing
    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        self.tail.append(line)
        if self.error is not None:  # an error block runs to the next blank or unindented line
            if line.strip() and (line.startswith((" ", "\t")) or not self.error):
                self.error.append(line)
                return
            self.errors.append(self.error)
            for err in self.error:
                self.emit(err)
            self.error = None
        if self.stats is not None:
            m = re.match(r"^(\w+)\s+(\d+)\s*$", line)
            if line.startswith("total"):
                self.total = int(line.split()[-1])
                counts = ", ".join(s for s in self.stats if not s.startswith("all "))
                self.emit(f"snakemake: {self.total} jobs to run ({counts})")
                self.stats = None
            elif m:
                self.stats.append(f"{m.group(1)} {m.group(2)}")
            return
        if self.block is not None:
            m = FIELD.match(line)
            if m:
                self.block[m.group(1)] = m.group(2)
                return
            self.running[self.block.get("jobid", "?")] = self.block
            self.block = None
        if line.startswith("Job stats:"):
            self.stats = []
        elif m := RULE.match(line):
            self.block = {"rule": m.group(1), "start": time.monotonic()}
        elif m := FINISHED.match(line):
            self.finished = self.running.pop(m.group(1), {"rule": "?", "start": time.monotonic()})
        elif m := STEPS.match(line):
            self.done, self.total = int(m.group(1)), int(m.group(2))
            job, self.finished = self.finished, None
            if job and job["rule"] != "all":
                width = len(str(self.total))
                what = describe(job, self.workdir)
                self.emit(f"[{self.done:>{width}}/{self.total}] {clock(time.monotonic() - self.t0):>5}  "
                          f"{job['rule']:<18} {duration(time.monotonic() - job['start']):>8}" + (f"  {what}" if what else ""))
        elif m := ERROR.match(line):
            self.error = [line]
        elif m := LOG.match(line):
            self.log_path = m.group(1).strip()
        elif line.startswith("Nothing to be done"):
            self.nothing = True

    def finish(self, returncode: int) -> None:
        if self.block is not None:
            self.running[self.block.get("jobid", "?")] = self.block
            self.block = None
        if self.error is not None:
            self.errors.append(self.error)
            for err in self.error:
                self.emit(err)
            self.error = None
        self._clear_status()
        elapsed = clock(time.monotonic() - self.t0)
        if returncode == 0:
            if self.nothing:
                self.emit("snakemake: nothing to do, every result is up to date")
            else:
                self.emit(f"snakemake: {self.done} of {self.total} jobs done in {elapsed}")
        else:
            for block in self.errors:  # the end of each failed job's own log
                log = next((ln.split(":", 1)[1].strip() for ln in block if ln.strip().startswith("log:")), "")
                log = log.split(" (check log file")[0].split(",")[0].strip()
                if log and (self.workdir / log).is_file():
                    lines = (self.workdir / log).read_text(errors="replace").splitlines()[-20:]
                    self.emit(f"--- last {len(lines)} lines of {log}")
                    for ln in lines:
                        self.emit("    " + ln)
            if not self.errors:  # failed before any job ran (a config error, a missing input): what it said
                for ln in self.tail:
                    self.emit(ln)
            self.emit(f"snakemake failed (exit {returncode}) after {elapsed}")
        if self.log_path:
            self.emit(f"full Snakemake log: {self.log_path}")


def _workdir(snakemake_args: list[str]) -> str:
    """Snakemake's working directory (--directory / -d), where the jobs' paths are relative to."""
    for i, arg in enumerate(snakemake_args):
        if arg in ("--directory", "-d") and i + 1 < len(snakemake_args):
            return snakemake_args[i + 1]
        if arg.startswith("--directory="):
            return arg.split("=", 1)[1]
    return "."


def run(snakemake_args: list[str], verbose: bool = False, out=sys.stdout) -> int:
    cmd = [sys.executable, "-m", "snakemake", *snakemake_args]
    if verbose:
        return subprocess.call(cmd)
    progress = Progress(out, live=out.isatty(), workdir=_workdir(snakemake_args))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace")
    lines: queue.Queue = queue.Queue()

    def pump():
        for ln in proc.stdout:
            lines.put(ln)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            try:
                ln = lines.get(timeout=1.0)
            except queue.Empty:
                progress.status()
                continue
            if ln is None:
                break
            progress.feed(ln)
            progress.status()
        returncode = proc.wait()
    except KeyboardInterrupt:  # Snakemake got the same SIGINT: let it stop its jobs
        returncode = proc.wait()
        progress.finish(returncode or 130)
        return 130
    progress.finish(returncode)
    return returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glrs.progress", description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true", help="Snakemake's whole log instead of a line per job")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="arguments for snakemake (after --)")
    args = p.parse_args(argv)
    rest = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    return run(rest, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
