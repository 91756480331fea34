"""`snakemake --report` on the tiny-model pipeline, rendered in a real headless browser (Debian's chromium).

The report is a single-page app that renders from JSON embedded in the HTML; the test asserts on what the
browser actually rendered (the workflow description, the result categories, the DAG) and on the results the
page embeds (every figure, the summary table, the provenance files), and loads every embedded figure in the
browser to check that none is broken.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_snakemake import snakemake, write_config

pytestmark = pytest.mark.pipeline

FIGURES = ["ppl_vs_density.png", "zeroshot_vs_density.png", "stage_times.png", "allocation.png", "spectra.png"]
CAPTIONS = {  # a phrase of each figure's caption (workflow/report/*.rst)
    "ppl_vs_density.png": "Perplexity versus achieved density",
    "zeroshot_vs_density.png": "Mean zero-shot accuracy",
    "stage_times.png": "Stage wall times",
    "allocation.png": "Allocation heat maps",
    "spectra.png": "Singular values of each weight W",
}


# Runs inside the report page: the report is a React app (global `app`, embedded `results`). Not started on
# 'load': the page also asks a CDN for tailwind, and offline that fetch holds 'load' back; it starts when React
# has mounted the app. No timers: headless chromium's virtual time makes them unreliable; renders are flushed
# synchronously instead.
DRIVER = """
const glrsDrive = async () => {
  const probe = document.createElement('pre');
  probe.id = 'glrs-probe'; probe.style.display = 'none';
  const report = {menu: null, figures: [], error: null};
  try {
    const figures = Object.keys(results).filter(p => p.endsWith('.png')).sort();
    const order = figures.filter(p => !p.endsWith('ppl_vs_density.png')).concat(figures.filter(p => p.endsWith('ppl_vs_density.png')));
    ReactDOM.flushSync(() => app.showCategory("Figures"));
    report.menu = document.body.innerText;
    for (const path of order) {
      ReactDOM.flushSync(() => app.showResultInfo(path));
      ReactDOM.flushSync(() => app.setView({content: "img", contentPath: results[path].data_uri, resultPath: path}));
      const img = [...document.images].find(i => i.getAttribute('src') === results[path].data_uri);
      const ok = !img ? false : await new Promise(res => {
        if (img.complete) { res(img.naturalWidth > 0); return; }
        img.addEventListener('load', () => res(true));
        img.addEventListener('error', () => res(false));
      });
      report.figures.push({path: path, decoded: ok, width: img ? img.naturalWidth : -1, height: img ? img.naturalHeight : -1,
                           text: document.body.innerText});
    }
  } catch (e) { report.error = String(e); }
  probe.textContent = JSON.stringify(report);
  document.body.appendChild(probe);
};
// once React has mounted the app (its constructor sets the global `app`)
let glrsStarted = false;
const glrsTry = () => {
  if (glrsStarted || typeof app === 'undefined' || !app) return;
  glrsStarted = true;
  glrsObserver.disconnect();
  glrsDrive();
};
const glrsObserver = new MutationObserver(glrsTry);
glrsObserver.observe(document.getElementById('app'), {childList: true, subtree: true});
glrsTry();
"""


def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; tests/system-deps.sh does it in CI)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"chromium at {exe} does not start: {e}")
    return exe


def browse(exe: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,2000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


def embedded(dom: str) -> dict[str, bytes]:
    """filename -> bytes of every result the report embeds as a data URI."""
    out = {}
    for m in re.finditer(r'data:[\w/+.-]+;charset=utf8;filename=([^;"]+);base64,([A-Za-z0-9+/=]+)', dom):
        out[m.group(1)] = base64.b64decode(m.group(2))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_llama_dir):
    exe = chromium()
    wd = tmp_path_factory.mktemp("report")
    write_config(wd, tiny_llama_dir, methods=["cap", "magnitude"], evaluation={"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 1024,
                                                "zeroshot": {"tasks": ["glrs_nextsent"], "limit": 5}})
    snakemake(wd)
    snakemake(wd, "--report", str(wd / "report.html"))
    return exe, wd


def test_report_renders_in_a_browser(report):
    exe, wd = report
    page = wd / "report.html"
    assert page.stat().st_size > 10_000
    url = page.resolve().as_uri()
    shot = wd / "shot.png"
    browse(exe, wd / "profile-shot", url, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1400) and pixels.std() > 0.05  # not a blank page

    dom = browse(exe, wd / "profile-dom", url, "--dump-dom", "--virtual-time-budget=5000").stdout
    rendered = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", rendered))
    # What the app rendered: the workflow description (workflow/report/workflow.rst, with the config filled in),
    # the result categories in the menu, and the rule graph (drawn by vega on a canvas, from the embedded spec).
    assert "Configuration of this run" in text and "glrs_nextsent" in text
    for category in ("Figures", "Results", "Provenance"):
        assert category in text
    assert re.search(r'<canvas[^>]*class="marks"', rendered) and "Save as PNG" in text
    for rule in ("evaluate_zeroshot", "evaluate_ppl", "summarise", "plot_ppl", "plot_zeroshot", "plot_stage_times"):
        assert f'"{rule}"' in dom, rule

    files = embedded(dom)
    for name in FIGURES:
        assert files[name][:8] == b"\x89PNG\r\n\x1a\n", name
        assert CAPTIONS[name] in dom, name
    rows = list(csv.DictReader(files["summary.csv"].decode().splitlines()))
    assert {r["method"] for r in rows} == {"dense", "cap", "magnitude"}
    assert all(r["acc_glrs_nextsent"] != "" and r["ppl_pydoc"] != "" for r in rows)
    versions = dict(csv.reader(files["software_versions.csv"].decode().splitlines()))
    assert {"python", "torch", "transformers", "snakemake", "lm_eval", "glrs"} <= set(versions)
    assert "zeroshot" in files["config_used.yaml"].decode()

    # Drive the app as a reader would: open the Figures category, then each figure's view (its <img> in the
    # report's own page and its caption in the side panel); the ppl figure is shown last, for the screenshot.
    driven = wd / "report-driven.html"
    page_html = page.read_text()
    cut = page_html.rindex("</body>")
    driven.write_text(page_html[:cut] + "<script>" + DRIVER + "</script>" + page_html[cut:])
    out = browse(exe, wd / "profile-driven", driven.resolve().as_uri(), "--dump-dom", "--virtual-time-budget=10000").stdout
    probe = json.loads(html.unescape(re.search(r'<pre id="glrs-probe"[^>]*>(.*?)</pre>', out, re.S).group(1)))
    assert probe["error"] is None, probe["error"]
    for name in FIGURES:
        assert f"results/plots/{name}" in probe["menu"], name
    shown = {Path(f["path"]).name: f for f in probe["figures"]}
    assert set(shown) == set(FIGURES)
    for name, f in shown.items():
        assert f["decoded"] and f["width"] > 200 and f["height"] > 100, f  # the image is not broken
        assert CAPTIONS[name] in f["text"], name
    browse(exe, wd / "profile-driven-shot", driven.resolve().as_uri(), f"--screenshot={wd / 'shot-figure.png'}",
           "--virtual-time-budget=10000")
    assert (wd / "shot-figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
