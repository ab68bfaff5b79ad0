# TEMPORARY dev override (helper session): delete before handing back.
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dag_project():
    return Path(os.environ["DEV_TINY_DAG"])
