# Stage 2: one job per (allocator, density) gathers every layer's factors and spends one global budget.
# Under stage1 weights it reads no Stage-1 file: it splits the model's weights itself (glrs.stage1).
# The .json holds the per-matrix budgets (rank and sparse entries) that realisers spend; the per-candidate
# keep-masks (.safetensors) are written only where realise.mode select materialises them.


def allocate_command(wc, input, output):
    run = PLAN.run_by_alloc_key(wc.alloc_key)
    calib = (f"--model-dir {input.model} " if "model" in input.keys() else "") + (
        f"--calib {input.calib} " if "calib" in input.keys() else "") + (
        f"--stats {' '.join(input.stats)}" if "stats" in input.keys() else "")
    masks = f"--masks-out {output.masks} " if "masks" in output.keys() else ""
    return (f"python -m glrs allocate {PLAN.stage1_args()} --allocator {run.allocator} --density {run.density} "
            f"--params {shell_json(run.params)} --seed {config['seed']} {calib} --device {config['device']} "
            f"--json-out {output.json} {masks}")


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
        command=allocate_command,
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
