# Any model spec -> one safetensors checkpoint, keyed by the source's content hash.


rule prepare_model:
    conda:
        "../../envs/glrs.yaml"
    output:
        directory(PLAN.model_dir),
    params:
        spec=config["model"],
        dtype=config["dtype"],
        revision=config.get("model_revision", "main"),
    log:
        f"{RESULTS}/logs/prepare_model/{PLAN.model_key}.log",
    benchmark:
        f"{RESULTS}/bench/prepare_model/{PLAN.model_key}.tsv"
    shell:
        "python -m glrs prepare-model --spec {params.spec:q} --dtype {params.dtype} --revision {params.revision:q} "
        "--out {output} > {log} 2>&1"


rule calibrate:
    # CAP's critical path (calibrate -> activations -> allocate -> realise -> materialise) first: on a
    # small machine the evaluations of the dense and baseline models fill the cores around it
    priority: 50
    conda:
        "../../envs/glrs.yaml"
    input:
        PLAN.model_dir,
    output:
        PLAN.calib_file,
    params:
        calib=shell_json(PLAN.calib_params),
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/calibrate/{PLAN.calib_key}.log",
    benchmark:
        f"{RESULTS}/bench/calibrate/{PLAN.model_key}/{PLAN.calib_key}.tsv"
    shell:
        "python -m glrs calibrate --model-dir {input} --params {params.calib} --seed {params.seed} --out {output} > {log} 2>&1"
