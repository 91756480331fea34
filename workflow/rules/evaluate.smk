# Perplexity of the dense model and of every compressed model, then one summary table of the whole results tree.


def model_under_test(wc):
    if wc.target == PLAN.dense_target:
        return {"model": PLAN.model_dir}
    return {"model": f"{RESULTS}/compressed/{wc.target}"}


rule evaluate_ppl:
    input:
        unpack(model_under_test),
    output:
        f"{RESULTS}/metrics/{{target}}/ppl-{{dataset}}-{{eval_key}}.json",
    params:
        model=lambda wc, input: input.model if wc.target == PLAN.dense_target else f"{input.model}/hf",
        info=lambda wc, input: "" if wc.target == PLAN.dense_target else f"--info {input.model}/info.json",
        dataset=lambda wc: PLAN.dataset_by_safe_name(wc.dataset),
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
        "{GLRS} evaluate-ppl --model {params.model} {params.info} --dataset {params.dataset:q} --seqlen {params.seqlen} "
        "{params.max_tokens} --dtype {params.dtype} --device {params.device} --out {output} > {log} 2>&1"


rule evaluate_zeroshot:
    input:
        unpack(model_under_test),
    output:
        f"{RESULTS}/metrics/{{target}}/zeroshot-{{zs_key}}.json",
    wildcard_constraints:
        zs_key=one_of([PLAN.zeroshot_key] if PLAN.zeroshot_key else []),
    params:
        model=lambda wc, input: input.model if wc.target == PLAN.dense_target else f"{input.model}/hf",
        info=lambda wc, input: "" if wc.target == PLAN.dense_target else f"--info {input.model}/info.json",
        tasks=" ".join(PLAN.zeroshot_tasks),
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
        "{GLRS} evaluate-zeroshot --model {params.model} {params.info} --tasks {params.tasks} {params.limit} "
        "--dtype {params.dtype} --device {params.device} --seed {params.seed} --out {output} > {log} 2>&1"


rule summarize:
    input:
        PLAN.all_metrics(),
        PLAN.all_zeroshot(),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Results"),
    shell:
        "{GLRS} summarize --results {RESULTS} --out {output}"
