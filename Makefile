# padistill: `make demo` runs the toy distillation, `make test` the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel for CI and laptops. GPU users: install your CUDA torch into $(VENV) first, it is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench bench-teacher bench-comparison bench-probe bench-ablations bench-ablations-a \
	bench-ablations-b bench-report teacher clean

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

# The benchmark in parts, each one command well under 90 minutes on 2 cores (the comparison one training
# seed at a time, both arms; the ablations in two halves); finished runs are reused, and every part rewrites
# benchmarks/results/distill.{json,md} from all the runs finished so far.
ABLATIONS_A := conditional-only,no-re-noising-1-2-steps,d-backbone-frozen
ABLATIONS_B := d-plain-cnn,mse-adversarial,lora-then-full-4-2-steps
bench: bench-teacher bench-seed-0 bench-seed-1 bench-seed-2 bench-probe bench-ablations-a bench-ablations-b

bench-teacher: install
	$(BIN)/python benchmarks/toy_teacher.py

bench-seed-%: install
	$(BIN)/python benchmarks/distill.py --part comparison --seeds $* $(BENCH_ARGS)

bench-comparison: bench-seed-0 bench-seed-1 bench-seed-2

bench-probe: install
	$(BIN)/python benchmarks/discriminator.py --run runs/bench/toy_digits-s0 --stage 2 \
		--game "recipe:" --game "base:lr=1e-6,disc_steps=1"

bench-ablations-a: install
	$(BIN)/python benchmarks/distill.py --part ablations --only $(ABLATIONS_A) $(BENCH_ARGS)

bench-ablations-b: install
	$(BIN)/python benchmarks/distill.py --part ablations --only $(ABLATIONS_B) $(BENCH_ARGS)

bench-ablations: bench-ablations-a bench-ablations-b

bench-report: install
	$(BIN)/python benchmarks/distill.py --part report

teacher: install
	$(BIN)/padistill toy-teacher

clean:
	rm -rf runs/ .pytest_cache
