# Everyday commands; see docs/ops.md for the whole flow. Tools come from $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DATA ?= data/cifar10
DVC_REMOTE ?=
SERVE_CONFIG ?= configs/serve.yaml

.PHONY: help install test test-full lint format train-quick serve bench data repro push

help:
	@echo "install      virtualenv $(VENV) with the project, dev and ops extras; git hooks"
	@echo "test         the everyday test tier: python -m pytest (what pull requests run)"
	@echo "test-full    the whole suite, slow tests included (what CI runs on main)"
	@echo "lint         ruff check, ruff format --check, mypy (CI's gates)"
	@echo "format       ruff format + ruff check --fix"
	@echo "train-quick  quick recipe on $(DATA) (CPU is fine) -> runs/quick/best"
	@echo "serve        the Serve app locally ($(SERVE_CONFIG))"
	@echo "bench        preprocessing and training-overhead benchmarks"
	@echo "data         $(DATA): dvc pull the recorded version, else run the prepare stage"
	@echo "repro        the DVC pipeline prepare -> train -> evaluate"
	@echo "push         dvc push data and models (DVC_REMOTE=local for the offline remote)"

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e ".[dev,ops]"
	$(BIN)/pre-commit install

test:
	$(PY) -m pytest

test-full:
	$(PY) -m pytest --full

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train-quick:
	$(PY) ray_jobs/train.py --config configs/quick.yaml data.path=$(DATA) output_dir=runs/quick

serve:
	PATH="$(abspath $(BIN)):$$PATH" serve run $(SERVE_CONFIG)

bench:
	$(PY) bench/preprocess_bench.py
	$(PY) bench/train_overhead.py

data:
	$(BIN)/dvc pull $(if $(DVC_REMOTE),-r $(DVC_REMOTE)) prepare || PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro prepare

repro:
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

push:
	$(BIN)/dvc push $(if $(DVC_REMOTE),-r $(DVC_REMOTE))
