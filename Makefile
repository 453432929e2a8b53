# padistill: `make demo` runs the toy distillation, `make test` the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel for CI and laptops. GPU users: install your CUDA torch into $(VENV) first, it is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test reliability-table demo demo-mse demo-compare bench bench-teacher teacher-fashion bench-comparison bench-balanced-report bench-probe bench-ablations bench-report bench-fashion-report bench-fashion-probe bench-fashion-long-report teacher clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Fashion-MNIST (the sharp benchmark, data.kind fashion_mnist) comes from Debian's package: installed here when
# make runs as root or with passwordless sudo, otherwise make stops with the command to run.
FASHION_PACKAGE := dataset-fashion-mnist
FASHION_FILE := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

$(FASHION_FILE):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(FASHION_PACKAGE); \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $(FASHION_PACKAGE); \
	else echo "make: Fashion-MNIST is missing: run 'sudo apt-get install -y $(FASHION_PACKAGE)' (Debian/Ubuntu), then make again" >&2; exit 1; fi
	@test -f $@ || { echo "make: $(FASHION_PACKAGE) did not install $@" >&2; exit 1; }

install: $(VENV)/.installed $(FASHION_FILE)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# docs/reliability.md's fault table, from the records the last `make test` left under runs/reliability/
reliability-table:
	$(BIN)/python tests/reliability.py

demo: install
	$(BIN)/padistill distill --config toy_fashion $(DEMO_ARGS)

# the demo's MSE-only baseline (same chain and updates), then both side by side in one PNG and table
demo-mse: install
	$(BIN)/padistill distill --config toy_fashion_mse $(DEMO_ARGS)

demo-compare: demo demo-mse
	$(BIN)/python benchmarks/compare_runs.py runs/toy_fashion runs/toy_fashion_mse \
		--labels adversarial,MSE-only --out benchmarks/results/toy_fashion_demo

# The benchmark in parts, each one command under 90 minutes on 2 cores (the comparison one arm and training
# seed at a time: the adversarial arm 10-15 min, the MSE-only arm, which reuses its seed's first stage,
# 5 min; the ablations one at a time, 3-8 min each); finished runs are reused, and every part rewrites
# benchmarks/results/distill.{json,md} from all the runs finished so far.
ABLATIONS := conditional-only no-re-noising-1-2-steps d-backbone-frozen d-plain-cnn \
	adversarial-alone-no-mse-term mse-term-at-every-stage-10x lora-then-full-4-2-steps
bench: bench-teacher bench-comparison bench-probe bench-ablations
.SECONDARY:  # the per-seed and per-ablation parts are commands, not files: nothing to delete

bench-teacher: install
	$(BIN)/python benchmarks/toy_teacher.py

bench-seed-%: bench-adv-% bench-mse-%
	@true

bench-adv-%: install
	$(BIN)/python benchmarks/distill.py --part comparison --arms adversarial --seeds $* $(BENCH_ARGS)

bench-mse-%: install
	$(BIN)/python benchmarks/distill.py --part comparison --arms mse --seeds $* $(BENCH_ARGS)

bench-comparison: bench-seed-0 bench-seed-1 bench-seed-2

# the digits with a balanced game at 4 and 2 steps (10x MSE, a LoRA through the conditional phase; docs/method.md):
# adversarial about 10 min a seed, MSE-only 5 (its seed's first stage reused) -> benchmarks/results/distill_balanced.md
bench-balanced-adv-%: install
	$(BIN)/python benchmarks/distill.py --benchmark digits_balanced --part comparison --arms adversarial --seeds $* $(BENCH_ARGS)

bench-balanced-mse-%: install
	$(BIN)/python benchmarks/distill.py --benchmark digits_balanced --part comparison --arms mse --seeds $* $(BENCH_ARGS)

bench-balanced-report: install
	$(BIN)/python benchmarks/distill.py --benchmark digits_balanced --part report

# the discriminator probe on the comparison's seed-0 run (bench-adv-0 first): D alone per arm against the 8->4
# stage's start student (the trainer's own game per stage is in the comparison's report, "The games")
bench-probe: install
	$(BIN)/python benchmarks/discriminator.py --config runs/bench/toy_digits-s0/config.yaml \
		--run runs/bench/toy_digits-s0 --stage 2 --d-steps 300 --out benchmarks/results/discriminator_digits

# the sharp benchmark: the demo's configs at 500 samples a model, one arm and training seed at a time
bench-fashion-adv-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion --part comparison --arms adversarial --seeds $* $(BENCH_ARGS)

bench-fashion-mse-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion --part comparison --arms mse --seeds $* $(BENCH_ARGS)

bench-fashion-ablation-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion --part ablations --only $* $(BENCH_ARGS)

bench-fashion-report: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion --part report

# the discriminator probe on the sharp benchmark with the shipped config (about 16 min with the 960-update first
# stage): stage 1 and the 8->4 stage's trajectories (reused when finished), then D alone per arm, three probe seeds
PROBE_ROOT := runs/probe/toy_fashion-s0
bench-fashion-probe: install
	$(BIN)/padistill distill --config toy_fashion --set run_root=$(PROBE_ROOT) --until 1
	$(BIN)/padistill distill --config toy_fashion --set run_root=$(PROBE_ROOT) --only traj-2
	for s in 0 1 2; do $(BIN)/python benchmarks/discriminator.py --config $(PROBE_ROOT)/config.yaml --run $(PROBE_ROOT) \
		--stage 2 --d-steps 300 --seed $$s --out benchmarks/results/discriminator_fashion_shipped_seed$$s || exit 1; done

# the sharp benchmark with 4x longer adversarial stages (200 D-only warm-up updates first) and disc_lr 1e-4:
# adversarial ~30 min a seed, MSE-only ~12-20 min (stage 1 and the teacher's samples reused)
bench-fashion-long-adv-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion_long --part comparison --arms adversarial --seeds $* $(BENCH_ARGS)

bench-fashion-long-mse-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion_long --part comparison --arms mse --seeds $* $(BENCH_ARGS)

bench-fashion-long-ablation-%: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion_long --part ablations --only $* $(BENCH_ARGS)

bench-fashion-long-report: install
	$(BIN)/python benchmarks/distill.py --benchmark fashion_long --part report

bench-ablation-%: install
	$(BIN)/python benchmarks/distill.py --part ablations --only $* $(BENCH_ARGS)

bench-ablations: $(addprefix bench-ablation-,$(ABLATIONS))

bench-report: install
	$(BIN)/python benchmarks/distill.py --part report

teacher: install
	$(BIN)/padistill toy-teacher

# The Fashion-MNIST teacher (~2 h on 2 cores); rerunning resumes from runs/toy_fashion_teacher_work.
teacher-fashion: install
	$(BIN)/padistill toy-teacher --config toy_fashion --work-dir runs/toy_fashion_teacher_work

clean:
	rm -rf runs/ .pytest_cache
