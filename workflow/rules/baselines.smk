# The methods CAP is compared with, at the same budget, from the same model and calibration samples.


rule compress:
    conda:
        "../../envs/glrs.yaml"
    input:
        model=PLAN.model_dir,
        calib=PLAN.calib_file,
    output:
        directory(f"{RESULTS}/compressed/{{comp_key}}"),
    wildcard_constraints:
        comp_key=key_pattern(r.comp_key for r in PLAN.baseline_runs),
    params:
        export=config.get("export", "none"),
        method=lambda wc: PLAN.run_by_comp_key(wc.comp_key).method,
        density=lambda wc: PLAN.run_by_comp_key(wc.comp_key).density,
        settings=lambda wc: shell_json(PLAN.run_by_comp_key(wc.comp_key).params),
        info=lambda wc: shell_json(PLAN.run_info(PLAN.run_by_comp_key(wc.comp_key))),
        seed=config["seed"],
        device=config["device"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/compress/{{comp_key}}.log",
    benchmark:
        f"{RESULTS}/bench/compress/{{comp_key}}.tsv"
    shell:
        "python -m glrs compress --model-dir {input.model} --calib {input.calib} --method {params.method} "
        "--density {params.density} --params {params.settings} --seed {params.seed} --run-info {params.info} "
        "--device {params.device} --export {params.export} --out {output} > {log} 2>&1"
