#!/usr/bin/env bash
# Issue 10's table from one GPU run: CAP with its defaults (learned budgets, realised), the uniform and OWL
# allocations under the same realisation, the paper as written, OATS at two rank ratios, SparseGPT and Wanda,
# at densities 0.4 / 0.5 / 0.6:
#   benchmarks/gpu/cap-table.sh MODEL.gguf SECONDS OUTDIR
# Streams beside CAP's (stage overlays, space-separated; each gets 2 GPU slots):
#   STREAMS="oats-0.1 baselines3 paper" (default: the whole table) or e.g. STREAMS="oats-0.1 sparsegpt-wanda";
#   a stream joins overlays with "+", and a name with a "/" is a file path, e.g. "config/paper.yaml+paper-loss"
#   (STREAM_OPTS, default "--cores 2 --resources gpu=2", sets each stream's share; REALISE_CORES, default 12,
#   CAP's realisation's)
# CAP_STAGE (default cap-default) is CAP's overlay and ZS_STAGE (default zs100) the evaluation's, e.g. issue 12's
# whole grid at four densities without zero-shot:
#   CAP_STAGE=cap-grid ZS_STAGE=no-zeroshot STREAMS="sparse-grid lowrank-grid oats-grid bolaco-sslc paper" ...
# Resumable: a second call with the same arguments finishes what the first left (results/ stays on a warm
# machine). Stage overlays are in benchmarks/gpu/stages; every process runs over config/comparison.yaml
# (128 x 512 calibration, whole held-out text). Summaries are written at the end of every call.
# OUTDIR gets ~14 files; the device tool returns at most 8, so give a folder outside $OUT and tar it into
# $OUT (as run on 2026-12-03: ... /tmp/t3 > /tmp/t3run.log; tar czf $OUT/t3.tgz /tmp/t3 /tmp/t3run.log).
# That run: 4 calls (setup, then 570 + 555 + 330 s of this script) for the whole table.
#
# Why the phases: on 2026-12-03 ~20 processes shared the one GPU (each its own CUDA context, time-sliced):
# a zero-shot evaluation took 440 s instead of ~20 s and nothing finished inside two calls. So the GPU sees
# at most ~8 processes, and CAP's 270 per-layer realise jobs (float32/64 linear algebra on small matrices)
# run on the 16 CPU cores instead (device=cpu for that phase only; the device is not part of any content
# key, and --rerun-triggers mtime keeps the phases from redoing each other's jobs).
set -uo pipefail
model=$1 budget=$2 out=$3
cap=${CAP_STAGE:-cap-default} zs=${ZS_STAGE:-zs100}
st=benchmarks/gpu/stages
start=$(date +%s)
export GLRS_GPU_LOCKS=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$out"
# summary.csv is the default target's input: present (from an earlier call's summaries) and newer than the
# metrics, it makes snakemake with --omit-from summarise plan 0 jobs. Summaries are remade at the end.
rm -f results/summary.csv
sm() {  # sm NAME SNAKEMAKE-OPTIONS... -- OVERLAYS...   (device=auto unless DEVICE is set)
    local name=$1; shift
    local opts=() files=(config/comparison.yaml)
    while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
    shift; for f in "$@"; do for g in ${f//+/ }; do [[ $g == */* ]] && files+=("$g") || files+=("$st/$g.yaml"); done; done
    local left=$(( budget - 40 - ($(date +%s) - start) ))
    (( left > 15 )) || { echo "$name: no time left" | tee -a "$out/status.log"; return 0; }
    timeout -k 5 "$left" python3 -m snakemake ${TARGETS:-} --nolock --rerun-incomplete --keep-going \
        --rerun-triggers mtime --scheduler greedy "${opts[@]}" --configfile "${files[@]}" \
        --config model="$model" device="${DEVICE:-auto}" >>"$out/$name.log" 2>&1
    echo "$name: exit $? at $(( $(date +%s) - start )) s" | tee -a "$out/status.log"
}
o=(--omit-from summarise)
TARGETS="activations calibrate" sm prep --cores 16 -- "$cap" "$zs"
[[ -f $out/cap_step.json || ${CAP_STEP:-1} == 0 ]] || {   # seconds per Stage-2 step on this GPU (issue 11's benchmark), once
    timeout 180 python3 benchmarks/cap_step.py --model-dir results/model/* --stats-dir results/stats/*/* \
        --calib results/calib/*/*.safetensors > "$out/cap_step.log" 2>&1
    cp results/benchmarks/cap_step.json "$out/" 2>/dev/null
} &
{   # CAP: Stage 2 on the GPU, realisation on the CPU cores, then materialise + evaluate on the GPU
    sm c-alloc --cores 3 --resources gpu=3 --until allocate -- "$cap" "$zs"
    DEVICE=cpu sm c-realise --cores "${REALISE_CORES:-12}" --until realise -- "$cap" "$zs"
    sm c-eval --cores 4 --resources gpu=4 "${o[@]}" -- "$cap" "$zs"
} &
for stage in ${STREAMS:-oats-0.1 baselines3 paper}; do
    { sm "${stage//\//_}" ${STREAM_OPTS:---cores 2 --resources gpu=2} "${o[@]}" -- "$stage" "$zs"; } &
done
wait
left=$(( budget - ($(date +%s) - start) ))
echo "summaries at $(( $(date +%s) - start )) s" | tee -a "$out/status.log"
python3 -m glrs summarise --results results --out results/summary.csv
python3 -m glrs summary results/summary.csv --wide --csv > "$out/summary.csv"
python3 -m glrs summary results/summary.csv | tee "$out/summary.txt"
tar czf "$out/results.tgz" results/summary.csv results/metrics results/alloc/*.json results/bench results/logs \
    results/realise/*/*.json 2>/dev/null
python3 - "$out/realise_meta.json" <<'PY'
import glob, json, sys
from safetensors import safe_open
meta = {}
for path in sorted(glob.glob("results/realise/*/layer_*.safetensors")):
    with safe_open(path, framework="pt") as f:
        meta[path] = json.loads(f.metadata()["glrs"])["matrices"]
json.dump(meta, open(sys.argv[1], "w"))
PY
ls -la "$out"; cat "$out/status.log"
