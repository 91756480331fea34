# Figures of the allocation (layer x matrix heat maps) and of the RPCA spectra (W vs L).


rule plot_allocation:
    input:
        [PLAN.alloc_json(r) for r in PLAN.cap_runs],
    output:
        f"{RESULTS}/plots/allocation.png",
    shell:
        "{GLRS} plot-allocation --alloc-json {input} --out {output}"


rule plot_spectra:
    input:
        model=PLAN.model_dir,
        rpca=PLAN.spectra_files,
    output:
        f"{RESULTS}/plots/spectra.png",
    shell:
        "{GLRS} plot-spectra --model-dir {input.model} --rpca {input.rpca} --out {output}"
