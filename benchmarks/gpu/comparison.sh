#!/usr/bin/env bash
# The comparison grid through the real pipeline on a GPU machine (the device tool's H200), resumable:
#   benchmarks/gpu/comparison.sh MODEL.gguf SECONDS OUTDIR [STAGES]
# Each stage is one snakemake run over config/comparison.yaml overlaid with benchmarks/gpu/stages/STAGE.yaml
# (docs/results-history.md names those each table used); "grid" is comparison.yaml alone and "lambda" overlays
# config/comparison-lambda.yaml. Stages run in order until SECONDS have passed; then what finished
# (summary, metrics, allocations, plots, logs, per-job wall times) is packed into OUTDIR/results.tgz.
# On one GPU run with GLRS_GPU_LOCKS=0 so that the gpu=6 jobs share it; NO_ZEROSHOT=1 adds the
# no-zeroshot overlay (for a machine without lm-eval's wheels).
set -uo pipefail
model=$1 budget=$2 out=$3 stages=${4:-cap init grid lambda}
here=$(dirname "$0")/stages
start=$(date +%s)
python3 -m snakemake --unlock --configfile config/comparison.yaml --config model="$model" >/dev/null 2>&1
for stage in $stages; do
    case $stage in
        grid) files=(config/comparison.yaml) ;;
        lambda) files=(config/comparison.yaml config/comparison-lambda.yaml) ;;
        *) [[ -f $here/$stage.yaml ]] || { echo "unknown stage $stage (no $here/$stage.yaml)" >&2; exit 2; }
           files=(config/comparison.yaml "$here/$stage.yaml") ;;
    esac
    [[ ${NO_ZEROSHOT:-0} == 1 ]] && files+=("$here/no-zeroshot.yaml")
    left=$(( budget - ($(date +%s) - start) ))
    (( left > 20 )) || break
    timeout "$left" python3 -m snakemake --cores 16 --resources gpu=6 --scheduler greedy --keep-going --rerun-incomplete \
        --configfile "${files[@]}" --config model="$model" device=auto >>"$out/snakemake.log" 2>&1
    echo "$stage: exit $?" | tee -a "$out/snakemake.log"
done
python3 -m glrs summarise --results results --out results/summary.csv
python3 -m glrs summary results/summary.csv
tar czf "$out/results.tgz" results/summary.csv results/metrics results/alloc/*.json results/plots results/bench results/logs 2>/dev/null
