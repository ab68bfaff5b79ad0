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
    """The team's MLflow server (`mlflow server --serve-artifacts`) on 127.0.0.1, on PostgreSQL
    (a throwaway cluster from Debian's `postgresql` package) where it is installed, else on
    SQLite."""
    from tests.factories import mlflow_server, postgres_database

    with postgres_database() as database, mlflow_server(tmp_path_factory.mktemp("team-mlflow"), database) as uri:
        print(f"team MLflow server {uri} on {'PostgreSQL' if database else 'SQLite'}")
        yield uri
