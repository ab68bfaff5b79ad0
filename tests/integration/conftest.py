"""Servers shared by the integration modules: one Prefect server and one MLflow server (the
team's), each started once for the package (~10-20 s each) and stopped after its last test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1; yields the client/worker environment."""
    from tests.integration.servers import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect")) as env:
        yield env


@pytest.fixture(scope="package")
def team_server(tmp_path_factory):
    """The team's MLflow server (`mlflow server --serve-artifacts`, SQLite) on 127.0.0.1."""
    from tests.factories import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("team-mlflow")) as uri:
        yield uri
