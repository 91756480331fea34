# Perplexity of the dense model and of every compressed model, then one summary table of the whole results tree.
# A perplexity key names its text: the evaluation text (always), or with evaluation.validation the validation
# text (its own file; glrs/data.py, docs/design.md section 8), where settings are chosen.


rule evaluate_ppl:
    conda:
        "../../envs/glrs.yaml"
    input:
        unpack(lambda wc: PLAN.model_under_test(wc.target)),
    output:
        f"{RESULTS}/metrics/{{target}}/ppl-{{dataset}}-{{eval_key}}.json",
    params:
        model=lambda wc, input: input.model,  # a compressed model is evaluated as it loads (glrs.load)
        info=lambda wc, input: "" if wc.target == PLAN.dense_target else f"--info {input.model}/info.json",
        dataset=lambda wc: PLAN.dataset_by_safe_name(wc.dataset),
        role=lambda wc: PLAN.ppl_role(PLAN.dataset_by_safe_name(wc.dataset), wc.eval_key),
        calibration=lambda wc: PLAN.calibration_arg(wc.target),
        seqlen=config["evaluation"]["seqlen"],
        max_tokens=lambda wc: f"--max-tokens {config['evaluation']['max_tokens']}" if config["evaluation"].get("max_tokens") else "",
        dtype=config["dtype"],
        device=config["device"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/evaluate_ppl/{{target}}/{{dataset}}-{{eval_key}}.log",
    benchmark:
        f"{RESULTS}/bench/evaluate_ppl/{{target}}/{{dataset}}-{{eval_key}}.tsv"
    shell:
        "python -m glrs evaluate-ppl --model {params.model} {params.info} --dataset {params.dataset:q} --role {params.role} "
        "{params.calibration} --seqlen {params.seqlen} "
        "{params.max_tokens} --dtype {params.dtype} --device {params.device} --out {output} > {log} 2>&1"


rule evaluate_zeroshot:
    conda:
        "../../envs/glrs.yaml"
    input:
        unpack(lambda wc: PLAN.model_under_test(wc.target)),
    output:
        f"{RESULTS}/metrics/{{target}}/zeroshot-{{zs_key}}.json",
    wildcard_constraints:
        zs_key=key_pattern([PLAN.zeroshot_key] if PLAN.zeroshot_key else []),
    params:
        model=lambda wc, input: input.model,  # a compressed model is evaluated as it loads (glrs.load)
        info=lambda wc, input: "" if wc.target == PLAN.dense_target else f"--info {input.model}/info.json",
        tasks=" ".join(PLAN.zeroshot_tasks),
        calibration=lambda wc: PLAN.calibration_arg(wc.target),
        limit=lambda wc: f"--limit {config['evaluation']['zeroshot']['limit']}" if config["evaluation"].get("zeroshot", {}).get("limit") else "",
        dtype=config["dtype"],
        device=config["device"],
        seed=config["seed"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/evaluate_zeroshot/{{target}}/{{zs_key}}.log",
    benchmark:
        f"{RESULTS}/bench/evaluate_zeroshot/{{target}}/{{zs_key}}.tsv"
    shell:
        "python -m glrs evaluate-zeroshot --model {params.model} {params.info} --tasks {params.tasks} {params.limit} "
        "{params.calibration} "
        "--dtype {params.dtype} --device {params.device} --seed {params.seed} --out {output} > {log} 2>&1"


rule summarise:
    conda:
        "../../envs/glrs.yaml"
    input:
        PLAN.all_metrics(),
        PLAN.all_zeroshot(),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Results"),
    params:
        results=lambda wc, output: os.path.dirname(output[0]),  # the whole results tree, not only this plan's runs
    log:
        f"{RESULTS}/logs/summarise.log",
    shell:
        "python -m glrs summarise --results {params.results} --out {output} > {log} 2>&1"
