# Figures: the allocation (layer x matrix heat maps), the RPCA spectra (W vs L; W alone under stage1:
# weights, which has no L and no Stage-1 file), perplexity and zero-shot
# accuracy vs density per method (from the summary), stage wall times (from the benchmarks); and the
# provenance (software versions, effective config) that the report shows next to them.


rule plot_allocation:
    conda:
        "../../envs/glrs.yaml"
    input:
        list(dict.fromkeys(PLAN.alloc_json(r) for r in PLAN.cap_runs)),  # one per allocation (several realisers share it)
    output:
        report(f"{RESULTS}/plots/allocation.png", caption="../report/allocation.rst", category="Figures"),
    log:
        f"{RESULTS}/logs/plot_allocation.log",
    shell:
        "python -m glrs plot-allocation --alloc-json {input} --out {output} > {log} 2>&1"


rule plot_spectra:
    conda:
        "../../envs/glrs.yaml"
    input:
        model=PLAN.model_dir,
        rpca=PLAN.spectra_files,
    output:
        report(f"{RESULTS}/plots/spectra.png", caption="../report/spectra.rst", category="Figures"),
    params:
        stage1=PLAN.stage1_args(PLAN.spectra_layers),
    log:
        f"{RESULTS}/logs/plot_spectra.log",
    shell:
        "python -m glrs plot-spectra --model-dir {input.model} {params.stage1} --out {output} > {log} 2>&1"


rule plot_ppl:
    conda:
        "../../envs/glrs.yaml"
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/plots/ppl_vs_density.png", caption="../report/ppl_vs_density.rst", category="Figures"),
    log:
        f"{RESULTS}/logs/plot_ppl.log",
    shell:
        "python -m glrs plot-ppl --summary {input} --out {output} > {log} 2>&1"


rule plot_zeroshot:
    conda:
        "../../envs/glrs.yaml"
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/plots/zeroshot_vs_density.png", caption="../report/zeroshot_vs_density.rst", category="Figures"),
    log:
        f"{RESULTS}/logs/plot_zeroshot.log",
    shell:
        "python -m glrs plot-zeroshot --summary {input} --out {output} > {log} 2>&1"


rule plot_stage_times:
    conda:
        "../../envs/glrs.yaml"
    input:
        f"{RESULTS}/summary.csv",  # after every evaluation, so that their benchmark files exist
    output:
        report(f"{RESULTS}/plots/stage_times.png", caption="../report/stage_times.rst", category="Figures"),
    params:
        bench=f"{RESULTS}/bench",
    log:
        f"{RESULTS}/logs/plot_stage_times.log",
    shell:
        "python -m glrs plot-stage-times --bench {params.bench} --out {output} > {log} 2>&1"


rule versions:
    conda:
        "../../envs/glrs.yaml"
    output:
        versions=report(f"{RESULTS}/software_versions.csv", caption="../report/versions.rst", category="Provenance"),
        config=report(f"{RESULTS}/config_used.yaml", caption="../report/config.rst", category="Provenance"),
    params:
        config=shell_json(config),
    log:
        f"{RESULTS}/logs/versions.log",
    shell:
        "python -m glrs versions --config-json {params.config} --csv-out {output.versions} --config-out {output.config} > {log} 2>&1"
