# The two quickstart commands: `make run` (set up + run the whole DAG) and `make test`.
.PHONY: setup run test test-fast lint
.PHONY: push pull deploy worker
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

# Team setup (README): share data, adapters and models through the DVC default remote, and
# run the Prefect deployments of prefect.yaml on workers (each in its own clone, like this one).
POOL ?= stunning

push: setup
	.venv/bin/dvc push

pull: setup
	.venv/bin/dvc pull

deploy: setup
	.venv/bin/python -m flows.deploy --pool $(POOL)

# One flow run at a time per worker: a training run takes the whole machine (CPU, GPU or unified
# memory), and the training fan-out (flows/fanout.py) counts one style group per free worker.
worker: setup
	STUNNING_ROOT=$(CURDIR) STUNNING_POOL=$(POOL) .venv/bin/prefect worker start --pool $(POOL) --limit 1
