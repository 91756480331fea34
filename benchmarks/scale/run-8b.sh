#!/usr/bin/env bash
# Issues 12 and 21: a seeded random Llama-3-8B-shaped checkpoint through the whole default pipeline on one GPU
# machine (prepare -> calibrate -> activations -> Stage 2 -> realise per layer -> materialise -> perplexity),
# timed, memory- and disk-measured per stage, with a 70B projection:
#   bash benchmarks/scale/run-8b.sh [SECONDS]        (default 530: one device call of <= 9 minutes)
# Resumable: every call continues where the last stopped (results/ stays on a warm machine; an interrupted
# job is rerun, the activations job keeps the layers it finished), and every call ends by writing
# results/benchmarks/scale_8b.json (benchmarks/scale/collect.py: "complete": true once snakemake finished).
# Needs: torch, transformers, safetensors; snakemake is installed from ./.whl when missing (carry .whl);
# a tokenizer at $TOKENIZER (default results/scale/tokenizer: SmolLM2's, carried; any HF tokenizer with
# <= 128256 ids). Environment: GLRS_GPU_MEMORY_GB=24 caps every GPU job (Stage 2 then offloads its
# weights); MODEL_ARGS (random_llama.py's shape options) and EXTRA_CONFIG (one more overlay) make a small
# check; DEVICE (default auto), GPUS (concurrent GPU jobs, default 4), CORES (default 16).
set -uo pipefail
budget=${1:-530}
start=$(date +%s)
state=${STATE:-results/scale}
model=$(realpath -m "${MODEL:-$state/llama8b}")
tok=${TOKENIZER:-$state/tokenizer}
log=$state/run.log
export GLRS_GPU_LOCKS=${GLRS_GPU_LOCKS:-0} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$state" results/benchmarks
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }
wheels() { python3 -m pip install -q --no-index --find-links .whl "$@" snakemake; }
python3 -c "import snakemake" 2>/dev/null || wheels || wheels --break-system-packages \
    || { say "snakemake missing and not installable from .whl (carry .whl)"; exit 1; }
if [[ ! -f $model/random_llama.json ]]; then
    [[ -f $tok/tokenizer_config.json ]] || { say "no tokenizer at $tok (carry results/scale/tokenizer)"; exit 1; }
    say "making the random checkpoint $model"
    python3 benchmarks/scale/random_llama.py --out "$model" --tokenizer-from "$tok" \
        ${MODEL_ARGS:-} > "$state/random_llama.log" 2>&1 || { say "random_llama.py failed: $state/random_llama.log"; exit 1; }
fi
left=$(( budget - 25 - ($(date +%s) - start) ))
rc=124
if (( left > 20 )); then
    say "snakemake for at most $left s"
    timeout -k 10 "$left" python3 -m snakemake --profile profiles/local-gpu --cores "${CORES:-16}" \
        --resources gpu="${GPUS:-4}" --configfile config/config.yaml config/scale-8b.yaml ${EXTRA_CONFIG:+$EXTRA_CONFIG} \
        --config model="$model" device="${DEVICE:-auto}" >> "$state/snakemake.log" 2>&1
    rc=$?
fi
say "snakemake exit $rc"
python3 benchmarks/scale/collect.py --results results --source "$model" --complete "$rc" \
    --out results/benchmarks/scale_8b.json --note "${NOTE:-}" | tee -a "$log"
tail -n 3 "$state/snakemake.log"
