"""Byte-reproducible training outputs: the same inputs give the same files in any process
(safetensors header order, PEFT's target-module set), after a crash and resume, and after a
SIGKILL at a random (seeded) moment; `stunning train` locks its --out."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LORA = "pytorch_lora_weights.safetensors"
# One training run in a fresh interpreter (its own string-hash seed, its own safetensors map order).
CHILD = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from stunning.training.trainer import train_style
from tests.factories import tiny_train_config
base, curated, out, ck, steps, every = sys.argv[1:7]
cfg = tiny_train_config(steps=int(steps), batch_size=2, checkpoint_every=int(every), learning_rate=5e-3)
train_style(base, "sd3", curated, "noir", cfg, out, None, ck if ck != "-" else None, "cpu", sample_seeds=(),
            progress=False)
"""


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    from tests.factories import make_curated

    return make_curated(tmp_path_factory.mktemp("curated"))


def _child(tiny_base, curated, out: Path, ck: Path | None, steps: int, every: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_base), str(curated), str(out), str(ck or "-"),
                             str(steps), str(every)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _run(*args) -> None:
    proc = _child(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "noir").iterdir())}


def test_lora_metadata_is_canonical(tmp_path, tiny_base, curated):
    import json
    import struct

    from stunning.training.trainer import train_style
    from tests.factories import tiny_train_config

    cfg = tiny_train_config(steps=2, batch_size=2, checkpoint_every=2, learning_rate=5e-3)
    train_style(tiny_base, "sd3", curated, "noir", cfg, tmp_path / "a", None, None, "cpu", sample_seeds=(),
                progress=False)
    raw = (tmp_path / "a" / "noir" / LORA).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                found.append(v) if k.endswith("target_modules") else walk(v)

    walk(json.loads(meta["lora_adapter_metadata"]))
    assert found and all(t == sorted(t) for t in found), found


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_sigkill_at_a_random_checkpoint_then_rerun_gives_the_same_bytes(tmp_path, tiny_base, curated):
    """Killed with SIGKILL after the 1st-3rd checkpoint (seeded choice), rerun to the end:
    byte-identical to a run that was never interrupted. The reference is written by this
    process and the resumed adapter by two others with random hash seeds, so this is also
    the check that separate processes write the same bytes (adapter and train_config.yaml)."""
    from stunning.training.trainer import train_style
    from tests.factories import tiny_train_config

    steps, every = 40, 5
    torch.set_num_threads(1)  # the uninterrupted reference in this process (one start-up less)
    cfg = tiny_train_config(steps=steps, batch_size=2, checkpoint_every=every, learning_rate=5e-3)
    train_style(tiny_base, "sd3", curated, "noir", cfg, tmp_path / "straight", None, None, "cpu", sample_seeds=(),
                progress=False)
    rng = random.Random(20240601)
    kill_after = rng.randint(1, 3)
    ck = tmp_path / "ck"
    proc = _child(tiny_base, curated, tmp_path / "killed", ck, steps, every)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(ck.glob("noir/*/step-*/state.json"))
        if done and max(int(p.parent.name.split("-")[1]) for p in done) >= kill_after * every:
            time.sleep(rng.uniform(0, 0.2))  # somewhere inside the next interval
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "noir" / LORA).exists()
    _run(tiny_base, curated, tmp_path / "killed", ck, steps, every)
    assert set(_files(tmp_path / "straight")) == {LORA, "train_config.yaml"}
    assert _files(tmp_path / "killed") == _files(tmp_path / "straight")


def test_a_second_run_into_the_same_out_fails_at_once_naming_the_first(tmp_path):
    from stunning.oneoff import RunLock, RunLocked

    work = tmp_path / "out" / ".work"
    with RunLock(work):
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()}"):
            RunLock(work).acquire()
    with RunLock(work):  # released on exit
        pass
    # A holder killed with SIGKILL leaves its file behind, never its lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from stunning.oneoff import RunLock; "
                               f"lock = RunLock({str(work)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(RunLocked, match=rf"pid {holder.pid}"):
        RunLock(work).acquire()
    holder.kill()
    holder.wait(timeout=30)
    with RunLock(work):
        pass
