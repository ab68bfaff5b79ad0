# The two quickstart commands: `make run` (set up + run the whole DAG) and `make test`.
.PHONY: setup run test test-fast lint
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# Stage commands in dvc.yaml say `python`: make that the project environment.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/dvc repro

test: setup
	.venv/bin/python -m pytest

test-fast: setup
	.venv/bin/python -m pytest -m "not slow and not e2e"

lint: setup
	.venv/bin/ruff check .
