# Figures: the allocation (layer x matrix heat maps), the RPCA spectra (W vs L), perplexity and zero-shot
# accuracy vs density per method (from the summary), stage wall times (from the benchmarks); and the
# provenance (software versions, effective config) that the report shows next to them.


rule plot_allocation:
    input:
        [PLAN.alloc_json(r) for r in PLAN.cap_runs],
    output:
        report(f"{RESULTS}/plots/allocation.png", caption="../report/allocation.rst", category="Figures"),
    shell:
        "{GLRS} plot-allocation --alloc-json {input} --out {output}"


rule plot_spectra:
    input:
        model=PLAN.model_dir,
        rpca=PLAN.spectra_files,
    output:
        report(f"{RESULTS}/plots/spectra.png", caption="../report/spectra.rst", category="Figures"),
    shell:
        "{GLRS} plot-spectra --model-dir {input.model} --rpca {input.rpca} --out {output}"


rule plot_ppl:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/plots/ppl_vs_density.png", caption="../report/ppl_vs_density.rst", category="Figures"),
    shell:
        "{GLRS} plot-ppl --summary {input} --out {output}"


rule plot_zeroshot:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/plots/zeroshot_vs_density.png", caption="../report/zeroshot_vs_density.rst", category="Figures"),
    shell:
        "{GLRS} plot-zeroshot --summary {input} --out {output}"


rule plot_stage_times:
    input:
        f"{RESULTS}/summary.csv",  # after every evaluation, so that their benchmark files exist
    output:
        report(f"{RESULTS}/plots/stage_times.png", caption="../report/stage_times.rst", category="Figures"),
    shell:
        "{GLRS} plot-stage-times --bench {RESULTS}/bench --out {output}"


rule versions:
    output:
        versions=report(f"{RESULTS}/software_versions.csv", caption="../report/versions.rst", category="Provenance"),
        config=report(f"{RESULTS}/config_used.yaml", caption="../report/config.rst", category="Provenance"),
    params:
        config=as_json(config),
    shell:
        "{GLRS} versions --config-json {params.config} --csv-out {output.versions} --config-out {output.config}"
