# Stage 2: one job per (allocator, density) gathers every layer's factors and spends one global budget.
# Under stage1 weights it reads no Stage-1 file: it splits the model's weights itself (glrs.stage1).
# The .json holds the per-matrix budgets (rank and sparse entries) that realisers spend; the per-candidate
# keep-masks (.safetensors) are written only where realise.mode select materialises them.


rule allocate:
    priority: 30  # CAP's critical path first (see calibrate)
    conda:
        "../../envs/glrs.yaml"
    input:
        unpack(lambda wc: PLAN.allocate_inputs(wc.alloc_key)),
    output:
        json=f"{RESULTS}/alloc/{{alloc_key}}.json",
    wildcard_constraints:
        alloc_key=key_pattern(PLAN.budget_alloc_keys),
    params:
        command=lambda wc, input, output: PLAN.allocate_command(wc.alloc_key, input, output),
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/allocate/{{alloc_key}}.log",
    benchmark:
        f"{RESULTS}/bench/allocate/{{alloc_key}}.tsv"
    shell:
        "{params.command} > {log} 2>&1"


use rule allocate as allocate_with_masks with:
    output:
        json=f"{RESULTS}/alloc/{{alloc_key}}.json",
        masks=f"{RESULTS}/alloc/{{alloc_key}}.safetensors",
    wildcard_constraints:
        alloc_key=key_pattern(PLAN.masked_alloc_keys),
