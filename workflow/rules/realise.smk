# CAP's realisation (glrs/realise.py): the dense model's activation statistics (one job), then one job per
# (allocation, realiser, layer) that spends the allocation's per-matrix budgets: refitted low-rank + sparse weights
# (realise.mode refit) or pure sparsity by Wanda's or SparseGPT's pruning rule (wanda, sparsegpt).


rule activations:
    priority: 40  # CAP's critical path first (see calibrate)
    conda:
        "../../envs/glrs.yaml"
    input:
        model=PLAN.model_dir,
        calib=PLAN.calib_file,
    output:
        PLAN.stats_files,
    params:
        layers=" ".join(map(str, PLAN.layers)),
        out_dir=lambda wc, output: os.path.dirname(output[0]),
        device=config["device"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/activations/{PLAN.model_key}/{PLAN.stats_key}.log",
    benchmark:
        f"{RESULTS}/bench/activations/{PLAN.model_key}/{PLAN.stats_key}.tsv"
    shell:
        "python -m glrs activations --model-dir {input.model} --calib {input.calib} --layers {params.layers} "
        "--device {params.device} --out-dir {params.out_dir} > {log} 2>&1"


rule realise:
    priority: 20  # CAP's critical path first (see calibrate)
    conda:
        "../../envs/glrs.yaml"
    input:
        model=PLAN.model_dir,
        stats=lambda wc: PLAN.stats_file(int(wc.layer)),
        json=lambda wc: PLAN.alloc_json(PLAN.run_by_realise_key(wc.realise_key)),
    output:
        f"{RESULTS}/realise/{{realise_key}}/layer_{{layer}}.safetensors",
    wildcard_constraints:
        realise_key=key_pattern(r.realise_key for r in PLAN.realised_runs),
        layer=r"\d+",
    params:
        settings=lambda wc: shell_json(PLAN.realise_params_of(PLAN.run_by_realise_key(wc.realise_key))),
        device=config["device"],
    threads: 1
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/realise/{{realise_key}}/layer_{{layer}}.log",
    benchmark:
        f"{RESULTS}/bench/realise/{{realise_key}}/layer_{{layer}}.tsv"
    shell:
        "python -m glrs realise --model-dir {input.model} --stats {input.stats} --alloc-json {input.json} "
        "--layer {wildcards.layer} --params {params.settings} --device {params.device} --out {output} > {log} 2>&1"
