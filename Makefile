# padistill: `make demo` runs the toy distillation, `make test` the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel for CI and laptops. GPU users: install your CUDA torch into $(VENV) first, it is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench bench-teacher bench-comparison bench-probe bench-ablations teacher clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/padistill distill --config toy_digits $(DEMO_ARGS)

# The benchmark in parts, each well under 90 minutes on 2 cores; finished runs are reused.
bench: bench-teacher bench-comparison bench-probe bench-ablations

bench-teacher: install
	$(BIN)/python benchmarks/toy_teacher.py

bench-comparison: install
	$(BIN)/python benchmarks/distill.py --part comparison $(BENCH_ARGS)

bench-probe: install
	$(BIN)/python benchmarks/discriminator.py --run runs/bench/toy_digits-s0 --stage 2 \
		--game "recipe:" --game "base:lr=1e-6,disc_steps=1"

bench-ablations: install
	$(BIN)/python benchmarks/distill.py --part ablations $(BENCH_ARGS)

teacher: install
	$(BIN)/padistill toy-teacher

clean:
	rm -rf runs/ .pytest_cache
