"""Prefect deployments on a real server: `prefect server start` on 127.0.0.1, the deployments
of `prefect.yaml` registered (`python -m flows.deploy`, which also creates the process work
pool), a `prefect worker start --pool stunning` subprocess that picks up a run of the nightly
deployment and runs it in the project clone to completion. The server (tests/integration/conftest.py) is
shared with the team walkthrough; the worker is stopped by the test, also when it fails."""

from __future__ import annotations

import sys

import httpx
import pytest
import yaml

from flows.deploy import DeployConfigError, read_config
from tests.factories import REPO, run_in
from tests.integration.servers import run_in_env, started, wait_for_run, worker_command

# --------------------------------------------------------------------------- prefect.yaml, no server


def test_prefect_yaml_deploys_the_pipeline_and_the_nightly_on_params_cron():
    specs, pull = read_config(REPO / "prefect.yaml")
    by_name = {s.name: s for s in specs}
    assert by_name["full-pipeline"].entrypoint == "flows/pipeline.py:full_pipeline"
    assert by_name["nightly"].entrypoint == "flows/nightly.py:nightly_retrain"
    assert {s.work_pool for s in specs} == {"stunning"}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert [s["cron"] for s in by_name["nightly"].schedules] == [params["nightly"]["cron"]]
    # The worker enters its own clone at run time: the placeholder must reach the server unfilled.
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $STUNNING_ROOT }}"}}]
    for spec in specs:  # every entrypoint names a flow that exists
        path, _, func = spec.entrypoint.partition(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()


def test_a_deployment_without_a_work_pool_is_named_in_the_error(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: nightly\n    entrypoint: flows/nightly.py:nightly_retrain\n")
    with pytest.raises(DeployConfigError, match=r"deployments\[0\] \(nightly\) has no `work_pool.name`"):
        read_config(bad)
    with pytest.raises(DeployConfigError, match="not found"):
        read_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- a real server and worker


@pytest.mark.slow
@pytest.mark.e2e
def test_a_worker_runs_the_nightly_deployment_to_completion(tiny_dag_project, prefect_server, tmp_path):
    run_in(tiny_dag_project, sys.executable, "-m", "dvc", "repro")  # earlier tests may leave stages stale
    env = dict(prefect_server, STUNNING_ROOT=str(tiny_dag_project))
    api = env["PREFECT_API_URL"]
    # The worker starts outside the project (only the pull step takes a run into the clone),
    # at the same time as the deployment is registered, as on a team's machines.
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    with started(worker_command("nightly-worker"), env, worker_dir, tmp_path / "worker.log"):
        deployed = run_in_env(tiny_dag_project, env, sys.executable, "-m", "flows.deploy", "--name", "nightly")
        assert "nightly-retrain/nightly" in deployed.stdout, deployed.stdout + deployed.stderr
        deployment = httpx.get(f"{api}/deployments/name/nightly-retrain/nightly", timeout=10).json()
        assert deployment["work_pool_name"] == "stunning"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $STUNNING_ROOT }}"}}]
        run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10).json()
        finished = wait_for_run(api, run["id"], timeout=300)
    log = (tmp_path / "worker.log").read_text()
    assert finished["state"]["type"] == "COMPLETED", f"{finished['state']}\n{log[-4000:]}"
    assert finished["state"]["message"].startswith("nothing-to-do"), finished["state"]["message"]
    assert "set_working_directory" in log
    pools = httpx.post(f"{api}/work_pools/filter", json={}, timeout=10).json()
    assert [(p["name"], p["type"]) for p in pools] == [("stunning", "process")]
