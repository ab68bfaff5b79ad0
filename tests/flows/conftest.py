"""The flow tests' Prefect test harness: one temporary Prefect server for the package, stopped
after its last test (it polls and uses CPU while it runs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
