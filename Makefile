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
	$(BIN)/python -m cme_jax.generate --model smollm2-135m-instruct \
		--prompt "Give me three tips for writing clear documentation." --max-new-tokens 96

test: $(STAMP)
	$(BIN)/ruff check cme_jax tests benchmarks
	$(BIN)/ruff format --check cme_jax tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cme_jax tests benchmarks
	$(BIN)/ruff format --check cme_jax tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format cme_jax tests benchmarks
	$(BIN)/ruff check --fix cme_jax tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/forward.py

clean:
	rm -rf $(VENV) build *.egg-info
