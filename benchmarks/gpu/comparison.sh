#!/usr/bin/env bash
# The comparison grid through the real pipeline on a GPU machine (the device tool's H200), resumable:
#   benchmarks/gpu/comparison.sh MODEL.gguf SECONDS OUTDIR
# Runs config/comparison.yaml, then config/comparison-lambda.yaml, until SECONDS have passed, then packs
# what finished (summary, metrics, allocations, plots, logs, per-job wall times) into OUTDIR/results.tgz.
set -uo pipefail
model=$1 budget=$2 out=$3
start=$(date +%s)
sm() {
    local left=$(( budget - ($(date +%s) - start) ))
    (( left > 20 )) || return 0
    timeout "$left" python3 -m snakemake --cores 16 --resources gpu=6 --scheduler greedy --keep-going --rerun-incomplete \
        --configfile "$1" --config model="$model" device=auto >>"$out/snakemake.log" 2>&1
    echo "$1: exit $?" | tee -a "$out/snakemake.log"
}
python3 -m snakemake --unlock --configfile config/comparison.yaml --config model="$model" >/dev/null 2>&1
# First what issue 3 asks for (CAP vs uniform on one Stage 1), then the whole grid, then the second Stage 1.
sed -e 's/^methods: .*/methods: [cap]/' -e 's/^allocators: .*/allocators: [cap, uniform]/' \
    -e 's/^target_density: .*/target_density: [0.4, 0.5, 0.6]/' config/comparison.yaml > /tmp/cap-first.yaml
sm /tmp/cap-first.yaml
sm config/comparison.yaml
sm config/comparison-lambda.yaml
python3 -m glrs summarize --results results --out results/summary.csv
python3 -m glrs summary results/summary.csv
tar czf "$out/results.tgz" results/summary.csv results/metrics results/alloc/*.json results/plots results/bench results/logs 2>/dev/null
