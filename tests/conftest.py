"""Shared test set-up: offline, deterministic, and the expensive fixtures built once.

- `tiny_base` / `tiny_sd_unet`: randomly initialised tiny models of the two families, built
  once per session; `micro_base`: the shipped, trained micro model.
- `tiny_dag_project` / `default_dag_project`: the project copied into a temporary git
  repository with `dvc repro` run once, on tiny settings (wiring, reruns, flows) and on the
  shipped defaults (quality: the gate promotes); under `make test` (pytest-xdist) each runs
  on its own worker while the other tests run beside it (`CLONE_GROUPS`).
- `prefect_harness` (tests/flows/conftest.py): one Prefect test harness for the flow tests (its
  temporary server takes ~10-25 s to start, and uses CPU while it runs: started once, stopped
  after them).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny test models run fastest single-threaded; also keeps 2-core CI machines responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from tests.factories import TINY_DAG_PARAMS, copy_project, run_in

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- parallel runs
# `make test` runs two pytest-xdist workers. Each worker builds its own session fixtures, so
# the tests that share one reproduced clone must run on the same worker: they form one work
# unit here, by path (xdist's `xdist_group` mark rewrites a node attribute that pytest 9 no
# longer reads, so it groups nothing). The clones come first in the collection, so each
# starts at once on its own worker while the other tests fill in beside them, slow ones first.
CLONE_GROUPS = {
    "tests/e2e/test_quality.py": "default-dag",
    "tests/stages/test_export.py": "default-dag",  # reads the default clone's exports
    "tests/e2e/test_dag.py": "tiny-dag",
    "tests/e2e/test_kill_repro.py": "tiny-dag",
    "tests/flows/": "tiny-dag",
    "tests/integration/": "tiny-dag",  # the DVC remote round trip and the Prefect worker run
}


# Modules whose module-scoped fixture costs seconds (a Core ML conversion, a trained adapter, a
# registered champion): one work unit each, so the fixture is built on one worker only (split
# over both workers, the Core ML conversion ran twice: +29 s).
MODULE_UNITS = (
    "tests/unit/test_export_coreml.py",
    "tests/unit/test_export_onnx.py",
    "tests/unit/test_studio_negatives.py",
    "tests/unit/test_serve.py",
    "tests/unit/test_serve_api.py",
    "tests/unit/test_studio_app.py",
    "tests/stages/test_merge_validate.py",
    "tests/cli/test_generate_cli.py",
    "tests/unit/test_lora_roundtrip.py",
    "tests/unit/test_registry.py",
    "tests/unit/test_mlflow_store.py",
    "tests/unit/test_registry_server.py",
)


def _clone_group(nodeid: str) -> str | None:
    return next((group for prefix, group in CLONE_GROUPS.items() if nodeid.startswith(prefix)), None)


def _work_unit(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    return _clone_group(nodeid) or (module if module in MODULE_UNITS else nodeid)


def pytest_collection_modifyitems(config, items):
    """Clone groups first, then the modules holding `slow` tests, then the rest, each module's
    tests kept together and in file order (module fixtures are built once): long work starts
    early, so the two workers finish together instead of one waiting on the other."""
    order = list(dict.fromkeys(CLONE_GROUPS.values()))
    rank = {group: i for i, group in enumerate(order)}
    slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}

    def key(item) -> tuple[int, int]:
        group = rank.get(_clone_group(item.nodeid))
        if group is not None:
            return (0, group)
        module = item.nodeid.split("::")[0]
        return (1, 0) if module in slow_modules or module in MODULE_UNITS else (2, 0)

    items.sort(key=key)  # stable: equal keys keep their order


if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class CloneGroupScheduling(LoadScopeScheduling):
            """One work unit per clone group and per module of :data:`MODULE_UNITS`; every other
            test is a unit of its own (all modules as units measured 23 s slower: the workers
            finish further apart)."""

            def _split_scope(self, nodeid: str) -> str:
                return _work_unit(nodeid)

        config.option.loadscopereorder = False  # keep the collection order above
        return CloneGroupScheduling(config, log)


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised model of the micro model's layout (family `sd3`, the default)."""
    from stunning.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base") / "tiny-sd3", family="sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_unet(tmp_path_factory) -> Path:
    """A randomly initialised SD-1.5-layout model (family `sd-unet`)."""
    from stunning.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base") / "tiny-sd-unet", family="sd-unet", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A randomly initialised SDXL-layout model (family `sdxl`: two text encoders, size ids)."""
    from stunning.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base") / "tiny-sdxl", family="sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A randomly initialised FLUX.1-layout model (family `flux`: CLIP + T5, guidance embedding)."""
    from stunning.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base") / "tiny-flux", family="flux", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """`tiny_flux` without a guidance embedding (FLUX.1-schnell layout): same builder, same seed."""
    from stunning.families import save_model
    from stunning.tiny import FLUX_SETTINGS, flux_pipeline

    return save_model(flux_pipeline(0, guidance_embeds=False), tmp_path_factory.mktemp("base") / "tiny-flux-schnell",
                      FLUX_SETTINGS)


@pytest.fixture(scope="session")
def micro_base() -> Path:
    """The shipped, trained micro model (read-only: copy it before changing anything)."""
    from stunning.embedded import SHIPPED

    if not (SHIPPED / "model_index.json").is_file():
        pytest.fail(f"the shipped micro model is missing from {SHIPPED}; see stunning/embedded.py")
    return SHIPPED


def _reproduced(root: Path) -> Path:
    proc = run_in(root, sys.executable, "-m", "dvc", "repro")
    (root / "repro.log").write_text(proc.stdout + proc.stderr)
    return root


@pytest.fixture(scope="session")
def tiny_dag_project(tmp_path_factory) -> Path:
    """A temporary clone of the project with the whole DAG reproduced once on tiny settings
    (:data:`tests.factories.TINY_DAG_PARAMS`): every stage, path, param and metric wired as
    shipped, in about a minute. The wiring, rerun and flow tests use it."""
    root = copy_project(tmp_path_factory.mktemp("tiny-dag"), params=TINY_DAG_PARAMS)
    return _reproduced(root)


@pytest.fixture(scope="session")
def default_dag_project(tmp_path_factory) -> Path:
    """A temporary clone of the project with the whole DAG reproduced once on the shipped
    `params.yaml`: what `make run` does on a fresh clone (the quality run: the gate must promote)."""
    return _reproduced(copy_project(tmp_path_factory.mktemp("default-dag")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the tiny model's ops are too small to gain from more, and on a
    loaded CI machine OpenMP threads waiting on each other make a run 10-50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixed_batch_losses():
    """`run(fam, pipe, latents, cond, steps=15, lr=1e-2) -> (loss before, loss after)`: AdamW on
    the denoiser's trainable (LoRA) parameters, with the same noise and timesteps every step."""
    import torch

    def run(fam, pipe, latents, cond, steps: int = 15, lr: float = 1e-2) -> tuple[float, float]:
        params = [p for p in fam.denoiser(pipe).parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def fixed_loss():
            return fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(1))

        with torch.no_grad():
            before = float(fixed_loss())
        for _ in range(steps):
            loss = fixed_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return before, float(fixed_loss())

    return run
