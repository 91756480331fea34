#!/usr/bin/env bash
# Issue 10's table from one GPU run: CAP with its defaults (learned budgets, realised), the uniform and OWL
# allocations under the same realisation, the paper as written, OATS at two rank ratios, SparseGPT and Wanda:
#   benchmarks/gpu/cap-table.sh MODEL.gguf SECONDS OUTDIR
# Resumable: a second call with the same arguments finishes what the first left. Stage overlays are in
# benchmarks/gpu/stages; every process runs over config/comparison.yaml (128 x 512 calibration, whole
# held-out text). Summaries are written once at the end (processes run with --nolock on disjoint outputs).
set -uo pipefail
model=$1 budget=$2 out=$3
st=benchmarks/gpu/stages
start=$(date +%s)
# One CPU thread per job: on 2026-12-03 every job's torch took all 16 cores, and with ~20 jobs at once a
# Stage-2 step took 10-20 s instead of 1.5 s, so nothing finished inside two 10-minute calls.
export GLRS_GPU_LOCKS=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$out"
sm() {  # sm NAME SNAKEMAKE-OPTIONS... -- OVERLAYS...
    local name=$1; shift
    local opts=() files=(config/comparison.yaml)
    while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
    shift; for f in "$@"; do files+=("$st/$f.yaml"); done
    local left=$(( budget - ($(date +%s) - start) ))
    (( left > 20 )) || { echo "$name: no time left" | tee -a "$out/status.log"; return 0; }
    timeout "$left" python3 -m snakemake ${TARGETS:-} --nolock --rerun-incomplete --keep-going --scheduler greedy \
        "${opts[@]}" --configfile "${files[@]}" --config model="$model" device=auto \
        >>"$out/$name.log" 2>&1
    echo "$name: exit $? at $(( $(date +%s) - start )) s" | tee -a "$out/status.log"
}
TARGETS="activations calibrate" sm prep --cores 16 -- cap-default zs100
o=(--omit-from summarize)
sm c --cores 8 --resources gpu=8 "${o[@]}" -- cap-default zs100 &
{ sm b --cores 3 --resources gpu=3 "${o[@]}" -- baselines3 zs100; sm o --cores 3 --resources gpu=3 "${o[@]}" -- oats-0.1 zs100; } &
sm p --cores 3 --resources gpu=3 "${o[@]}" -- paper zs100 &
wait
python3 -m glrs summarize --results results --out results/summary.csv
python3 -m glrs summary results/summary.csv --wide --csv > "$out/summary.csv"
python3 -m glrs summary results/summary.csv
python3 - "$out/realise_meta.json" <<'PY'
import glob, json, sys
from safetensors import safe_open
meta = {}
for path in sorted(glob.glob("results/realise/*/layer_*.safetensors")):
    with safe_open(path, framework="pt") as f:
        meta[path] = json.loads(f.metadata()["glrs"])["matrices"]
json.dump(meta, open(sys.argv[1], "w"))
PY
tar czf "$out/results.tgz" results/summary.csv results/metrics results/alloc/*.json results/bench results/logs 2>/dev/null
ls -la "$out"
