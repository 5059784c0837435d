# Quick start: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# DeepSpeed on a CPU machine: its CPU accelerator and the gloo backend.
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint bench bench-zero3 docs clean

venv: $(VENV)/.installed

# deepspeed ships as an sdist whose setup imports torch: build it against the pinned
# torch (--no-build-isolation), or pip would fetch an unpinned (CUDA) torch to build it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch setuptools wheel
	$(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check hfbuilder tests benchmarks examples

bench: venv
	$(BIN)/python benchmarks/run.py --set cpu

# ZeRO-3 builds on 1, 2, 4 and 8 CPU ranks: private memory and bytes read per rank (tens of minutes).
bench-zero3: venv
	$(BIN)/python benchmarks/zero3_scale.py --out bench-out/zero3-scale.json

# The docs tools (the `docs` extra) are installed here only, not by `make venv`, to keep CI lean.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) install -c constraints.txt --no-build-isolation -e ".[docs]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
