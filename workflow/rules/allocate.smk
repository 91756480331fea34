# Stage 2: one job per (allocator, density) gathers every layer's factors and spends one global budget.
# Under rpca.method none it reads no Stage-1 file: it splits the model's weights itself (glrs.stage1).


rule allocate:
    priority: 30  # CAP's critical path first (see calibrate)
    conda:
        "../../envs/glrs.yaml"
    input:
        unpack(lambda wc: PLAN.allocate_inputs(wc.alloc_key)),
    output:
        json=f"{RESULTS}/alloc/{{alloc_key}}.json",
        masks=f"{RESULTS}/alloc/{{alloc_key}}.safetensors",
    params:
        stage1=PLAN.stage1_args(),
        allocator=lambda wc: PLAN.run_by_alloc_key(wc.alloc_key).allocator,
        density=lambda wc: PLAN.run_by_alloc_key(wc.alloc_key).density,
        settings=lambda wc: shell_json(PLAN.run_by_alloc_key(wc.alloc_key).params),
        calib=lambda wc, input: (f"--model-dir {input.model} " if "model" in input.keys() else "")
        + (f"--calib {input.calib} " if "calib" in input.keys() else "")
        + (f"--stats {' '.join(input.stats)}" if "stats" in input.keys() else ""),
        seed=config["seed"],
        device=config["device"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/allocate/{{alloc_key}}.log",
    benchmark:
        f"{RESULTS}/bench/allocate/{{alloc_key}}.tsv"
    shell:
        "python -m glrs allocate {params.stage1} --allocator {params.allocator} --density {params.density} "
        "--params {params.settings} --seed {params.seed} {params.calib} --device {params.device} "
        "--json-out {output.json} --masks-out {output.masks} > {log} 2>&1"
