"""glrs.progress (what `make demo` prints while Snakemake runs): one line per finished job, labelled from the
result record the job wrote, with Snakemake's error block and the end of the job's log when a job fails; on
a real (tiny) Snakemake run as well as on recorded logs of Snakemake 9 and 8."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from glrs.progress import Progress, describe

SNAKEMAKE9_LOG = """\
Assuming unrestricted shared filesystem usage.
Building DAG of jobs...
Job stats:
job                  count
-----------------  -------
decompose                2
evaluate_ppl             1
all                      1
total                    4

Select jobs to execute...
Execute 2 jobs...

[Thu Dec  3 06:30:31 2026]
localrule decompose:
    input: results/model/543a753726b7
    output: results/rpca/543a753726b7/de879c77160a/layer_0.safetensors
    jobid: 6
    reason: Missing output files
    wildcards: layer=0
    resources: tmpdir=/tmp, gpu=1
[Thu Dec  3 06:30:31 2026]
localrule evaluate_ppl:
    input: results/compressed/b5109fff9ce1
    output: results/metrics/b5109fff9ce1/ppl-pydoc-d3a14f16ddb0.json
    jobid: 9
    wildcards: target=b5109fff9ce1, dataset=pydoc, eval_key=d3a14f16ddb0
    resources: tmpdir=/tmp
[Thu Dec  3 06:30:44 2026]
Finished jobid: 6 (Rule: decompose)
1 of 4 steps (25%) done
Select jobs to execute...
[Thu Dec  3 06:30:45 2026]
Finished jobid: 9 (Rule: evaluate_ppl)
2 of 4 steps (50%) done
[Thu Dec  3 06:30:45 2026]
localrule decompose:
    output: results/rpca/543a753726b7/de879c77160a/layer_1.safetensors
    jobid: 7
    wildcards: layer=1
[Thu Dec  3 06:30:46 2026]
Finished jobid: 7 (Rule: decompose)
3 of 4 steps (75%) done
localrule all:
    input: results/summary.csv
    jobid: 0
Finished jobid: 0 (Rule: all)
4 of 4 steps (100%) done
Complete log(s): /wd/.snakemake/log/2026-12-03T063001.608105.snakemake.log
"""


def _metrics(wd: Path) -> None:
    path = wd / "results/metrics/b5109fff9ce1/ppl-pydoc-d3a14f16ddb0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"method": "cap", "allocator": "uniform", "target_density": 0.5, "dataset": "pydoc",
                                "ppl": 21.123456, "achieved_density": 0.5}))


def _feed(text: str, wd: Path, returncode: int = 0) -> list[str]:
    out = io.StringIO()
    progress = Progress(out, workdir=wd)
    for line in text.splitlines(keepends=True):
        progress.feed(line)
    progress.finish(returncode)
    return out.getvalue().splitlines()


def test_one_line_per_finished_job_labelled_from_its_result(tmp_path):
    _metrics(tmp_path)
    lines = _feed(SNAKEMAKE9_LOG, tmp_path)
    assert lines[0] == "snakemake: 4 jobs to run (decompose 2, evaluate_ppl 1)"
    jobs = lines[1:4]
    assert [ln.split()[2] for ln in jobs] == ["decompose", "evaluate_ppl", "decompose"]
    assert jobs[0].startswith("[1/4]") and jobs[0].endswith("layer 0")
    assert jobs[1].endswith("cap/uniform 0.5, pydoc perplexity 21.12")
    assert jobs[2].startswith("[3/4]") and jobs[2].endswith("layer 1")
    assert lines[4].startswith("snakemake: 4 of 4 jobs done in ")
    assert lines[5] == "full Snakemake log: /wd/.snakemake/log/2026-12-03T063001.608105.snakemake.log"
    assert len(lines) == 6  # nothing else of Snakemake's log
    assert all(len(ln) <= 120 for ln in lines)


def test_snakemake8_finished_lines(tmp_path):
    log = SNAKEMAKE9_LOG.replace("Finished jobid: 6 (Rule: decompose)", "Finished job 6.")
    log = log.replace("Finished jobid: 9 (Rule: evaluate_ppl)", "Finished job 9.")
    lines = _feed(log, tmp_path)
    assert [ln.split()[2] for ln in lines[1:4]] == ["decompose", "evaluate_ppl", "decompose"]
    # without the record on disk, the wildcards say what the job was, content keys left out
    assert lines[2].endswith("  dataset pydoc")


def test_describe_without_a_record_drops_content_keys():
    assert describe({"wildcards": "target=dense-543a753726b7, zs_key=549b78b548d9"}) == "target dense"
    assert describe({"wildcards": "layer=12"}) == "layer 12"
    assert describe({}) == ""


def _workflow(wd: Path, fail: bool) -> None:
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(f"""\
        rule all:
            input: "b.json"
        rule a:
            output: "a.txt"
            log: "logs/a.log"
            shell: "echo working > {{log}}; echo done > {{output}}"
        rule b:
            input: "a.txt"
            output: "b.json"
            log: "logs/b.log"
            shell: "(echo step one; echo 'Traceback: boom' >&2; exit {3 if fail else 0}) > {{log}} 2>&1; "
                   "echo '{{{{\\"method\\": \\"wanda\\", \\"target_density\\": 0.5, \\"achieved_density\\": 0.5}}}}' > {{output}}"
        """))


def _progress(wd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glrs.progress", *extra, "--", "--snakefile", str(wd / "Snakefile"),
                           "--directory", str(wd), "--cores", "1"], capture_output=True, text=True, timeout=300)


def test_a_real_snakemake_run(tmp_path):
    wd = tmp_path / "ok"
    _workflow(wd, fail=False)
    proc = _progress(wd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "snakemake: 3 jobs to run (a 1, b 1)"
    assert lines[1].startswith("[1/3]") and lines[1].split()[2] == "a"
    assert lines[2].startswith("[2/3]") and lines[2].endswith("wanda 0.5, achieved density 0.5000")
    assert lines[3].startswith("snakemake: 3 of 3 jobs done in ") and lines[4].startswith("full Snakemake log: ")
    assert len(lines) == 5
    again = _progress(wd)
    assert again.returncode == 0 and "nothing to do, every result is up to date" in again.stdout


def test_a_failing_job_shows_its_error_and_log(tmp_path):
    wd = tmp_path / "fail"
    _workflow(wd, fail=True)
    proc = _progress(wd)
    assert proc.returncode != 0
    out = proc.stdout
    assert "Error in rule b:" in out and "logs/b.log" in out
    assert "Traceback: boom" in out and "step one" in out  # the end of the job's own log
    assert "snakemake failed (exit 1)" in out


def test_verbose_passes_snakemake_log_through(tmp_path):
    wd = tmp_path / "verbose"
    _workflow(wd, fail=False)
    proc = _progress(wd, "--verbose")
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert "Job stats:" in log and "rule b:" in log and "[1/3]" not in log
