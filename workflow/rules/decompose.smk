# Stage 1: one independent RPCA job per transformer layer. Each job reads only its layer.
# Planned only for stage1 rpca: under stage1: weights (the default) nothing asks for these files (PLAN.rpca_files
# is empty) and each consumer splits the weights in memory (glrs.stage1), so the run has no decompose job.
# `gpu=1` lets `--resources gpu=K` bound concurrent GPU jobs; without that flag it constrains nothing.


rule decompose:
    conda:
        "../../envs/glrs.yaml"
    input:
        PLAN.model_dir,
    output:
        f"{RESULTS}/rpca/{PLAN.model_key}/{PLAN.stage1_key}/layer_{{layer}}.safetensors",
    wildcard_constraints:
        layer=r"\d+",
    params:
        rpca=shell_json(PLAN.rpca_params),
        device=config["device"],
    threads: 1
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/decompose/{PLAN.model_key}/{PLAN.stage1_key}/layer_{{layer}}.log",
    benchmark:
        f"{RESULTS}/bench/decompose/{PLAN.model_key}/{PLAN.stage1_key}/layer_{{layer}}.tsv"
    shell:
        "python -m glrs decompose --model-dir {input} --layer {wildcards.layer} --params {params.rpca} "
        "--device {params.device} --threads {threads} --out {output} > {log} 2>&1"
