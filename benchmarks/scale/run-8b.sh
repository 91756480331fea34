#!/usr/bin/env bash
# Issue 12: a randomly initialised Llama-3-8B-shaped checkpoint through the whole pipeline on one GPU
# (prepare -> per-layer jobs -> CAP Stage 2 -> realise -> materialise -> perplexity on a few windows),
# timed and memory-measured per stage:
#   benchmarks/scale/run-8b.sh TOKENIZER_DIR OUTDIR SECONDS
# TOKENIZER_DIR: any local HF tokenizer (the embedded SmolLM2's prepared directory). Runs in its own
# working directory (/tmp/scale-wd, a copy of this checkout) so that its results/ holds this run only;
# resumable: a second call with the same arguments continues (snakemake finds what is done) while the
# machine stays warm. MODEL_ARGS="--layers 2 --hidden 256 ..." (random_llama.py's options) and MODEL=DIR make
# another shape (a quick check on a small machine); EXTRA_CONFIG=FILE overlays one more config.
# Writes OUTDIR/scale_8b.json (benchmarks/scale/collect.py) and OUTDIR/snakemake.log.
set -uo pipefail
tok=$(realpath "$1") out=$(realpath -m "$2") budget=$3
start=$(date +%s)
repo=$(pwd) wd=${WORKDIR:-/tmp/scale-wd} model=${MODEL:-/tmp/llama8b}
mkdir -p "$out" "$wd"
tar cf - --exclude=./results --exclude=./.snakemake --exclude=./.whl --exclude=./.gpu --exclude=./.venv . \
    | tar xf - -C "$wd"
if [[ ! -f $model/random_llama.json ]]; then
    python3 benchmarks/scale/random_llama.py --out "$model" --tokenizer-from "$tok" \
        ${MODEL_ARGS:-} > "$out/random_llama.log" 2>&1
fi
cd "$wd"
left=$(( budget - 30 - ($(date +%s) - start) ))
timeout -k 5 "$left" python3 -m snakemake --profile profiles/local-gpu --cores "${CORES:-16}" --resources gpu="${GPUS:-4}" \
    --configfile config/config.yaml config/scale-8b.yaml ${EXTRA_CONFIG:+$EXTRA_CONFIG} \
    --config model="$model" device="${DEVICE:-auto}" >> "$out/snakemake.log" 2>&1
echo "snakemake exit $? at $(( $(date +%s) - start )) s" | tee -a "$out/status.log"
python3 "$repo/benchmarks/scale/collect.py" --results results --model-dir results/model/* --out "$out/scale_8b.json" \
    --note "${NOTE:-}" > /dev/null
tail -n 5 "$out/snakemake.log"; cat "$out/scale_8b.json" | head -60
