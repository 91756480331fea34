# The compressed model in glrs's compact format (glrs/compressed.py, docs/format.md): low rank + sparse values with a
# bitmask or 16-bit column support; a dense Hugging Face export under hf/ only with `export: dense`.
# `materialise` keeps the selected Stage-1 candidates (realise.mode select): from the Stage-1 files, or
# under stage1 weights from the model's weights split in memory (no Stage-1 file is an input then).


rule materialise:
    conda:
        "../../envs/glrs.yaml"
    input:
        unpack(lambda wc: PLAN.alloc_masks(PLAN.run_by_comp_key(wc.comp_key))),
        model=PLAN.model_dir,
        rpca=PLAN.rpca_files,
        json=lambda wc: PLAN.alloc_json(PLAN.run_by_comp_key(wc.comp_key)),
    output:
        directory(f"{RESULTS}/compressed/{{comp_key}}"),
    wildcard_constraints:
        comp_key=key_pattern(r.comp_key for r in PLAN.cap_runs if not r.realise_key),
    params:
        export=config.get("export", "none"),
        stage1=PLAN.stage1_args(),
        info=lambda wc: shell_json(PLAN.run_info(PLAN.run_by_comp_key(wc.comp_key))),
        masks=lambda wc, input: f"--masks {input.masks}" if "masks" in input.keys() else "",
    log:
        f"{RESULTS}/logs/materialise/{{comp_key}}.log",
    benchmark:
        f"{RESULTS}/bench/materialise/{{comp_key}}.tsv"
    shell:
        "python -m glrs materialise --model-dir {input.model} {params.stage1} {params.masks} "
        "--alloc-json {input.json} --run-info {params.info} --export {params.export} --out {output} > {log} 2>&1"


rule materialise_realised:
    priority: 20  # CAP's critical path first (see calibrate)
    conda:
        "../../envs/glrs.yaml"
    input:
        model=PLAN.model_dir,
        realised=lambda wc: PLAN.realised_files(PLAN.run_by_comp_key(wc.comp_key)),
        json=lambda wc: PLAN.alloc_json(PLAN.run_by_comp_key(wc.comp_key)),
    output:
        directory(f"{RESULTS}/compressed/{{comp_key}}"),
    wildcard_constraints:
        comp_key=key_pattern(r.comp_key for r in PLAN.realised_runs),
    params:
        export=config.get("export", "none"),
        info=lambda wc: shell_json(PLAN.run_info(PLAN.run_by_comp_key(wc.comp_key))),
        masks=lambda wc, input: f"--masks {input.masks}" if "masks" in input.keys() else "",
    log:
        f"{RESULTS}/logs/materialise/{{comp_key}}.log",
    benchmark:
        f"{RESULTS}/bench/materialise/{{comp_key}}.tsv"
    shell:
        "python -m glrs materialise-realised --model-dir {input.model} --realised {input.realised} "
        "--alloc-json {input.json} --run-info {params.info} --export {params.export} --out {output} > {log} 2>&1"
