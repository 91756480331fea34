#!/usr/bin/env bash
# The comparison grid through the real pipeline on a GPU machine (the device tool's H200), resumable:
#   benchmarks/gpu/comparison.sh MODEL.gguf SECONDS OUTDIR [STAGES]
# STAGES (default "cap init grid lambda"), each a snakemake run over one config, in order, until SECONDS
# have passed; then what finished (summary, metrics, allocations, plots, logs, per-job wall times) is
# packed into OUTDIR/results.tgz.
#   cap     CAP's allocators (cap, uniform, rpca-threshold) at 0.4 / 0.5 / 0.6 on one Stage 1
#   init    the same without Stage-2 learning (cap with epochs 0: its initial allocation alone)
#   entry   cap with the paper's untied per-candidate probabilities (policy: entry) at 0.5
#   grid    config/comparison.yaml: every method at 0.4-0.7
#   lambda  config/comparison-lambda.yaml: CAP's allocators on a second Stage 1
# On one GPU run with GLRS_GPU_LOCKS=0 so that the gpu=6 jobs share it.
set -uo pipefail
model=$1 budget=$2 out=$3 stages=${4:-cap init grid lambda}
start=$(date +%s)
sm() {
    local left=$(( budget - ($(date +%s) - start) ))
    (( left > 20 )) || return 0
    timeout "$left" python3 -m snakemake --cores 16 --resources gpu=6 --scheduler greedy --keep-going --rerun-incomplete \
        --configfile "$1" --config model="$model" device=auto >>"$out/snakemake.log" 2>&1
    echo "$1: exit $?" | tee -a "$out/snakemake.log"
}
python3 -m snakemake --unlock --configfile config/comparison.yaml --config model="$model" >/dev/null 2>&1
cap_only() { sed -e 's/^methods: .*/methods: [cap]/' -e "s/^allocators: .*/allocators: [$1]/" \
    -e 's/^target_density: .*/target_density: [0.4, 0.5, 0.6]/' config/comparison.yaml; }
for stage in $stages; do
    case $stage in
        cap) cap_only "cap, uniform, rpca-threshold" > /tmp/stage.yaml ;;
        init) cap_only cap | sed 's/^    epochs: .*/    epochs: 0/' > /tmp/stage.yaml ;;
        entry) cap_only cap | sed -e 's/^    epochs: .*/    epochs: 2\n    policy: entry/' \
                   -e 's/^target_density: .*/target_density: [0.5]/' > /tmp/stage.yaml ;;
        grid) cp config/comparison.yaml /tmp/stage.yaml ;;
        lambda) cp config/comparison-lambda.yaml /tmp/stage.yaml ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
    sm /tmp/stage.yaml
done
python3 -m glrs summarize --results results --out results/summary.csv
python3 -m glrs summary results/summary.csv
tar czf "$out/results.tgz" results/summary.csv results/metrics results/alloc/*.json results/plots results/bench results/logs 2>/dev/null
