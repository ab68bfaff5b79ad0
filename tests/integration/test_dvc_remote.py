"""The team setup on one machine, with real servers: the team's MLflow tracking server (its
registry and served artifacts), a Prefect server with two workers, a DVC remote, and clones
standing in for machines.

Clone A and worker w1 are copies of the reproduced tiny DAG; worker w2 is a bare `git clone`
of it (code and params: it reproduces the research report, curated data and base model
itself). Each has the same change: a new training seed (so `train` and all after it must run again) and the
registry on the team server (`registry.tracking_uri: http://...`). A runs the full-pipeline
flow from its first out-of-date phase with `STUNNING_POOL` set: the training phase sees two
free workers and
fans out one `train-styles` run per style; each worker trains its style in its own clone and
publishes the final checkpoint to the MLflow server; A downloads both, and its `dvc repro
train` resumes each at the last step instead of training; every stage after that (merge,
validate, export, register, docs, handoff) runs against the server, so the candidate is
registered and promoted there; the flow pushes to A's default DVC remote at the end.

Clone B (`git clone` of A's commit) pulls and has the same outputs, byte for byte, with
nothing for `dvc repro` to do but the `champion` stage, which always runs (it reads the
registry, which DVC does not carry) and writes the same record; B sees A's @champion on the
server and loads it from the server's artifacts.

Two remotes: a shared folder, and an S3-compatible bucket served on 127.0.0.1 by moto."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.dvc_runner import default_remote, transfer
from flows.pipeline import share_outputs
from stunning.mlflow_server import free_port
from tests.factories import run_in
from tests.integration.servers import POOL, run_in_env, started, wait_for_workers, worker_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# What DVC carries (cache: true outs of dvc.yaml) and so what B must get from the remote.
CACHED_OUTS = ("models/embedded", "data/sample", "data/ingested", "data/curated", "models/adapters",
               "checkpoints", "models/merged", "build/model_card", "dist/release")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_in(root, sys.executable, "-m", "dvc", *args)


def digest(root: Path, rel: str) -> dict[str, str]:
    """{relative file path: sha256} of every file under root/rel."""
    base = root / rel
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server (moto) on 127.0.0.1 with an empty bucket `team`; stopped after."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)  # DVC subprocesses inherit these
        port = free_port()
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="team")
            yield url
        finally:
            server.stop()


def set_param(root: Path, key: str, value: str) -> None:
    """Set the two-level `key` (section.name) in the clone's params.yaml, as a person would edit
    it (comments and layout kept)."""
    section, name = key.split(".")
    params = root / "params.yaml"
    text = params.read_text()
    body = re.search(rf"(?ms)^{section}:\n(.*?)(?=^\S)", text)
    assert body, f"params.yaml has no section {section}"
    new_body, n = re.subn(rf"(?m)^(  {name}:) [^#\n]*?(\s*(#.*)?)$", lambda m: f"{m.group(1)} {value}{m.group(2)}",
                          body.group(1), count=1)
    assert n == 1, f"params.yaml has no key {key}"
    params.write_text(text[:body.start(1)] + new_body + text[body.end(1):])


def use_registry(root: Path, tracking_uri: str) -> None:
    """Point the clone's `registry.tracking_uri` at `tracking_uri` (the one-line change the
    README's Team setup asks for)."""
    set_param(root, "registry.tracking_uri", tracking_uri)


def team_clone(source: Path, dest: Path, tracking_uri: str, fresh: bool = False) -> Path:
    """A machine's clone with the team's change (registry on the team server, a new training
    seed): a copy of `source` with its data and outputs, or (`fresh`) a `git clone` of it, which
    has code and params only and reproduces what training needs itself."""
    if fresh:
        run_in(dest.parent, "git", "clone", "-q", str(source), dest.name)
        assert not (dest / "data/curated").exists() and not (dest / "reports/research.json").exists()
    else:
        shutil.copytree(source, dest, symlinks=True)
    use_registry(dest, tracking_uri)
    set_param(dest, "train.seed", "1")
    return dest


@dataclass
class Team:
    a: Path
    workers: dict[str, Path]  # worker name -> its clone
    pipeline_log: str


@pytest.fixture(scope="module")
def team(tiny_dag_project, s3_endpoint, team_server, prefect_server, tmp_path_factory) -> Team:
    """A's run of the full pipeline, fanned out over two workers (the module docstring), its
    remotes in `.dvc/config` and its run committed, as a team member would before pushing
    (dvc.lock, the DVC config and the small uncached reports go to git, the rest to the
    remote): the default remote `team`, a shared folder, and `s3team`, the S3 bucket."""
    dvc(tiny_dag_project, "repro")  # earlier tests of the clone may leave stages out of date (a no-op otherwise)
    home = tmp_path_factory.mktemp("team")
    a = team_clone(tiny_dag_project, home / "a", team_server)
    # w1 has the data already (a copy); w2 is a bare `git clone`: its flow run reproduces the
    # research report, the curated data and the base model before training.
    workers = {name: team_clone(tiny_dag_project, home / name, team_server, fresh=name == "w2") for name in ("w1", "w2")}
    assert default_remote(a) is None  # the shipped project: no remote, `make run` needs none
    from dvc.config import Config

    # What `dvc remote add -d team DIR`, `dvc remote add s3team s3://team/stunning` and
    # `dvc remote modify s3team endpointurl URL` write (in-process: three DVC starts fewer).
    with Config(dvc_dir=str(a / ".dvc")).edit("repo") as conf:
        conf["remote"]["team"] = {"url": str(home / "shared-remote")}
        conf["remote"]["s3team"] = {"url": "s3://team/stunning", "endpointurl": s3_endpoint}
        conf["core"]["remote"] = "team"
    assert default_remote(a) == "team"

    api = prefect_server["PREFECT_API_URL"]
    run_in_env(a, prefect_server, sys.executable, "-m", "flows.deploy", "--name", "train-styles")
    with contextlib.ExitStack() as stack:
        for name, clone in workers.items():  # `make worker` on each worker machine, in its clone
            # Workers poll every 2 s (default 10): each takes one run, the other the second.
            env = dict(prefect_server, STUNNING_ROOT=str(clone), STUNNING_POOL=POOL, PREFECT_WORKER_QUERY_SECONDS="2")
            stack.enter_context(started(worker_command(name), env, home, home / f"{name}.log"))
        wait_for_workers(api, set(workers))
        # A's pipeline, as the nightly runs it (from the first phase with a stage out of date,
        # here training: the earlier phases would only find DVC with nothing to do).
        env = dict(prefect_server, STUNNING_ROOT=str(a), STUNNING_POOL=POOL)
        proc = run_in_env(a, env, sys.executable, "-c", "from flows.dvc_runner import status; "
                          "from flows.pipeline import full_pipeline; full_pipeline(list(status()))")
        assert "5-training" in proc.stdout + proc.stderr and "1-research" not in proc.stdout + proc.stderr
        # With everything up to date, the training phase's fan-out starts nothing.
        again = run_in_env(a, env, sys.executable, "-c",
                           "from flows.fanout import fan_out; print('groups:', fan_out().groups)")
    assert "groups: []" in again.stdout, again.stdout + again.stderr
    log = proc.stdout + proc.stderr
    registry = json.loads((a / "reports/registry.json").read_text())
    assert registry["promoted"] is True and registry["champion_version"] == registry["version"], registry
    for cmd in (["git", "add", "-A"],
                ["git", "-c", "user.name=a", "-c", "user.email=a@localhost", "commit", "-qm", "run"]):
        run_in(a, *cmd)
    return Team(a, workers, log)


@pytest.fixture(scope="module")
def clone_a(team) -> Path:
    return team.a


def clone_of(a: Path, dest: Path) -> Path:
    """`git clone` of A: code, params, dvc.lock, the remotes' config and the small reports only."""
    run_in(dest.parent, "git", "clone", "-q", str(a), dest.name)
    for rel in CACHED_OUTS:
        assert not (dest / rel).exists(), f"{rel} came through git; it must come from the DVC remote"
    return dest


def test_two_workers_train_a_style_each_and_a_resumes_both_from_the_servers_checkpoints(team, team_server):
    """The fan-out across machines: each worker trained one style in its own clone; A trained
    nothing itself (both styles resumed at their last step from the checkpoints it downloaded
    from the MLflow server) and its adapters are the workers' bytes."""
    from mlflow import MlflowClient

    from stunning.shared_checkpoints import BATCH_TAG

    report = json.loads((team.a / "reports/train.json").read_text())["styles"]
    assert sorted(report) == ["impressionist", "noir"]
    trained_by = {}
    for name, clone in team.workers.items():
        runs = list((clone / "build/fanout").glob("*/train.json"))
        assert len(runs) == 1, f"worker {name} ran {runs}"
        ((style, metrics),) = json.loads(runs[0].read_text())["styles"].items()
        assert metrics["resumed_from_step"] == 0  # trained there, from the first step
        trained_by[style] = name
        adapter = f"{style}/pytorch_lora_weights.safetensors"
        assert (runs[0].parent / "adapters" / adapter).read_bytes() == (team.a / "models/adapters" / adapter).read_bytes()
    assert sorted(trained_by) == ["impressionist", "noir"], trained_by  # one style each
    assert (team.workers["w2"] / "reports/research.json").is_file()  # the bare clone reproduced it
    for style, metrics in report.items():
        assert metrics["resumed_from_step"] == metrics["steps"] == 30, (style, metrics)
        assert re.search(rf"checkpoint of {style} \(step 30\) from MLflow run \w+: downloaded", team.pipeline_log)
    assert "was trained again here" not in team.pipeline_log
    # Everything tracked went to the server: the workers' runs (with their checkpoints) and A's.
    client = MlflowClient(team_server)
    runs = client.search_runs([client.get_experiment_by_name("stunning-engine").experiment_id],
                              filter_string="tags.stage = 'train'")
    published = [r for r in runs if BATCH_TAG in r.data.tags]
    assert sorted(r.data.tags["style"] for r in published) == ["impressionist", "noir"]
    # A's train stage logged its (resumed) runs to the server too, with the fingerprint each
    # worker computed in its own clone: what made the downloaded checkpoints resumable.
    ours = {s: client.get_run(m["mlflow_run_id"]).data.tags["fingerprint"] for s, m in report.items()}
    assert {r.data.tags["style"]: r.data.tags["fingerprint"] for r in published} == ours
    for r in published:
        files = {f.path for f in client.list_artifacts(r.info.run_id, "checkpoint/step-30")}
        assert {"checkpoint/step-30/lora.safetensors", "checkpoint/step-30/state.json"} <= files


def test_a_folder_remote_gives_a_second_clone_the_same_outputs_and_nothing_to_rerun(team, team_server, tmp_path):
    clone_a = team.a
    assert re.search(r"DVC remote 'team': \d+ files? pushed", team.pipeline_log), team.pipeline_log[-3000:]
    assert "up to date" in share_outputs(clone_a).lower()  # the pipeline flow pushed everything at the end
    b = clone_of(clone_a, tmp_path / "b")
    transfer("pull", b)  # the default remote, from the committed .dvc/config
    for rel in CACHED_OUTS:
        ours = digest(b, rel)
        assert ours and ours == digest(clone_a, rel), f"{rel} differs after the pull"
    # Only `champion` (always_changed) is reported; every other stage is up to date.
    assert json.loads(dvc(b, "status", "--json").stdout or "{}") == {"champion": ["always changed"]}

    # The same registry (the server): B sees A's @champion, and `dvc repro` reruns `champion`
    # only: it writes the same record, so validate does not rerun.
    from stunning.config import load_params
    from stunning.registry import aliases, resolve

    cfg = load_params(b / "params.yaml").registry
    assert cfg.tracking_uri == team_server  # through git: the params change A committed
    registry = json.loads((b / "reports/registry.json").read_text())  # A's register stage, via git
    assert aliases(cfg, root=b)["champion"] == registry["champion_version"]
    out = dvc(b, "repro").stdout
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'champion':"], out
    assert (b / "reports/champion.json").read_bytes() == (clone_a / "reports/champion.json").read_bytes()
    # ...and loads it from the server's artifacts (served: no path on A's disk is involved).
    version, folder = resolve(cfg, root=b)
    assert version == registry["champion_version"]
    assert folder.is_relative_to(b) and any(folder.rglob("*.safetensors")), folder


def test_an_s3_remote_round_trips_the_trained_adapters(clone_a, tmp_path):
    """The S3 configuration a team would use (`endpointurl` for a non-AWS store); the train
    stage's outputs (adapters and checkpoints) go up from A and come down into B."""
    assert "pushed" in transfer("push", clone_a, remote="s3team", targets=["train"])
    b = clone_of(clone_a, tmp_path / "b")
    transfer("pull", b, remote="s3team", targets=["train"])
    for rel in ("models/adapters", "checkpoints"):
        assert digest(b, rel) and digest(b, rel) == digest(clone_a, rel), rel
    assert not (b / "models/merged").exists()  # only what was asked for
