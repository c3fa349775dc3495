# Everything runs from a project-local virtual environment that these targets create.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cme_jax.train --config configs/demo_cpu.yaml --no-resume run_dir=runs/demo_cpu_$$(date +%Y%m%d_%H%M%S)

test: $(STAMP)
	$(BIN)/ruff check cme_jax tests benchmarks launch
	$(BIN)/ruff format --check cme_jax tests benchmarks launch
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cme_jax tests benchmarks launch
	$(BIN)/ruff format --check cme_jax tests benchmarks launch

format: $(STAMP)
	$(BIN)/ruff format cme_jax tests benchmarks launch
	$(BIN)/ruff check --fix cme_jax tests benchmarks launch

# Peers (transformers, TRL) run beside cme_jax in each benchmark; TRL is only needed here.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/grpo_step.py
	$(BIN)/python benchmarks/train_demo.py

clean:
	rm -rf $(VENV) build *.egg-info
