# tileseg: `make demo` runs the main job on a generated slide; `make test` sets up and tests;
# `make test-fast` is the inner loop (no slow tests, fewer hypothesis examples).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench clean

install: $(STAMP)

# Dev/CI installs are pinned by constraints.txt (torch there is the CPU build 2.13.0);
# the package itself only asks for torch>=2.4.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest --durations=15

test-fast: install lint
	HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -m "not slow" --durations=15

demo: install
	$(BIN)/tileseg demo

bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo-output bench/results .pytest_cache .ruff_cache .hypothesis
