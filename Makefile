# The two quickstart commands: `make run` (set up + run the whole DAG) and `make test`.
.PHONY: setup run test test-fast lint
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# Stage commands in dvc.yaml say `python`: make that the project environment.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	@bash scripts/setup.sh

# A `dvc repro` killed mid-write leaves DVC's rwlock file corrupt: repair it first (flows/dvc_runner.py).
run: setup
	.venv/bin/python -m flows.dvc_runner repair
	.venv/bin/dvc repro

# Two pytest-xdist workers (the machines are 2-core; tests run one torch thread each). The tests
# of one end-to-end clone run on one worker, so each clone is reproduced once (tests/conftest.py).
PYTEST_PAR := -n 2

test: setup
	.venv/bin/python -m pytest $(PYTEST_PAR)

test-fast: setup
	.venv/bin/python -m pytest $(PYTEST_PAR) -m "not slow and not e2e"

lint: setup
	.venv/bin/ruff check .
