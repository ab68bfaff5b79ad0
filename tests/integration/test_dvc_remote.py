"""The team setup on one machine, with real servers: an MLflow tracking server (the team's
registry), a DVC remote, and two clones. Clone A (the reproduced tiny DAG) switches its registry
to the server (`registry.tracking_uri: http://...`), reruns what reads or writes the registry
(champion, validate, register, docs, handoff: the candidate is registered on the server and
promoted), commits its run and pushes; clone B (`git clone` of A) pulls and has the same
outputs, byte for byte, with nothing for `dvc repro` to do but the `champion` stage, which
always runs (it reads the registry, which DVC does not carry) and writes the same record; B
sees A's @champion on the server and loads it from the server's artifacts.

Two remotes: a shared folder, and an S3-compatible bucket served on 127.0.0.1 by moto."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.dvc_runner import default_remote, transfer
from flows.pipeline import share_outputs
from stunning.mlflow_server import free_port
from tests.factories import run_in

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


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """The team's MLflow server (`mlflow server --serve-artifacts`, SQLite) on 127.0.0.1."""
    from tests.factories import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("team-mlflow")) as uri:
        yield uri


def use_registry(root: Path, tracking_uri: str) -> None:
    """Point the clone's `registry.tracking_uri` at `tracking_uri` (the one-line change the
    README's Team setup asks for)."""
    params = root / "params.yaml"
    text, n = re.subn(r"(?m)^(  tracking_uri:) \S+", lambda m: f"{m.group(1)} {tracking_uri}", params.read_text())
    assert n == 1, "registry.tracking_uri not found in params.yaml"
    params.write_text(text)


@pytest.fixture(scope="module")
def clone_a(tiny_dag_project, s3_endpoint, team_server, tmp_path_factory) -> Path:
    """A copy of the reproduced tiny DAG with the team's remotes in `.dvc/config` and its run
    committed, as a team member would before pushing (dvc.lock, the DVC config and the small
    uncached reports go to git, the rest to the remote): the default remote `team`, a shared
    folder, and `s3team`, the S3 bucket."""
    dvc(tiny_dag_project, "repro")  # earlier tests of the clone may leave stages out of date (a no-op otherwise)
    team = tmp_path_factory.mktemp("team")
    a = team / "a"
    shutil.copytree(tiny_dag_project, a, symlinks=True)
    assert default_remote(a) is None  # the shipped project: no remote, `make run` needs none
    from dvc.config import Config

    # What `dvc remote add -d team DIR`, `dvc remote add s3team s3://team/stunning` and
    # `dvc remote modify s3team endpointurl URL` write (in-process: three DVC starts fewer).
    with Config(dvc_dir=str(a / ".dvc")).edit("repo") as conf:
        conf["remote"]["team"] = {"url": str(team / "shared-remote")}
        conf["remote"]["s3team"] = {"url": "s3://team/stunning", "endpointurl": s3_endpoint}
        conf["core"]["remote"] = "team"
    assert default_remote(a) == "team"
    # The registry moves to the team's server: every stage with a `registry` param reruns, and
    # the candidate is registered there (the server is empty, so the gate promotes it).
    use_registry(a, team_server)
    out = dvc(a, "repro").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"champion", "validate", "register", "handoff"} <= ran, out
    registry = json.loads((a / "reports/registry.json").read_text())
    assert registry["promoted"] is True and registry["champion_version"] == registry["version"], registry
    for cmd in (["git", "add", "-A"],
                ["git", "-c", "user.name=a", "-c", "user.email=a@localhost", "commit", "-qm", "run"]):
        run_in(a, *cmd)
    return a


def clone_of(a: Path, dest: Path) -> Path:
    """`git clone` of A: code, params, dvc.lock, the remotes' config and the small reports only."""
    run_in(dest.parent, "git", "clone", "-q", str(a), dest.name)
    for rel in CACHED_OUTS:
        assert not (dest / rel).exists(), f"{rel} came through git; it must come from the DVC remote"
    return dest


def test_a_folder_remote_gives_a_second_clone_the_same_outputs_and_nothing_to_rerun(clone_a, team_server, tmp_path):
    assert "pushed" in share_outputs(clone_a)  # what the pipeline flow does at the end of a run
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
