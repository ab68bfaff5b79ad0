"""Run DVC from flows: `dvc repro` of given stages, `dvc status`, parsed into small results.

DVC runs as a subprocess of the current interpreter (`python -m dvc`) in the project root,
exactly as a user would run it, so a flow never holds DVC's repository lock longer than
the command it runs and stage code never sees Prefect.

:func:`repair_state` runs before every DVC command (and `make run` runs it before
`dvc repro`): DVC rewrites its `.dvc/tmp/rwlock` file in place, so a `dvc repro` killed
while writing it leaves an empty or truncated file, and every later DVC command then fails
with "Unable to read RWLock-file ... JSON structure is corrupted" until it is removed by hand
(treeverse/dvc#7615). The repair takes DVC's own guard lock for that file, and only when the
file does not parse moves it aside (`rwlock.corrupt`) so DVC starts a fresh one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


class DvcError(RuntimeError):
    """A DVC command failed; the message carries the end of its output."""


@dataclass
class ReproResult:
    targets: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output: str = ""


def project_root() -> Path:
    """The project root: $STUNNING_ROOT, else the folder above flows/."""
    return Path(os.environ.get("STUNNING_ROOT", Path(__file__).resolve().parent.parent))


def repair_state(root: Path | None = None) -> str | None:
    """Move aside a corrupt `.dvc/tmp/rwlock` (see the module docstring); returns what was done."""
    from dvc.lock import make_lock

    tmp = (root or project_root()) / ".dvc" / "tmp"
    rwlock = tmp / "rwlock"
    if not rwlock.is_file():
        return None
    # The same guard DVC holds while it edits the file: no DVC process is writing it now.
    with make_lock(str(tmp / "rwlock.lock"), tmp_dir=str(tmp), wait=True):
        try:
            json.loads(rwlock.read_text(encoding="utf-8"))
            return None
        except (ValueError, UnicodeDecodeError):
            os.replace(rwlock, tmp / "rwlock.corrupt")
    message = (f"{rwlock} was corrupt (a DVC process was killed while writing it); moved to rwlock.corrupt, "
               "DVC starts a fresh one")
    log.warning("%s", message)
    return message


def _dvc(args: list[str], root: Path) -> subprocess.CompletedProcess:
    repair_state(root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # Stage commands say `python`; make that this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, check=False
    )


def repro(targets: list[str], root: Path | None = None) -> ReproResult:
    """`dvc repro <targets>` (their upstream stages too, when changed)."""
    root = root or project_root()
    proc = _dvc(["repro", *targets], root)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise DvcError(f"dvc repro {' '.join(targets)} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return ReproResult(targets=targets, ran=_RAN.findall(out), skipped=_SKIPPED.findall(out), output=out)


def default_remote(root: Path | None = None) -> str | None:
    """The name of the DVC default remote (`dvc remote add -d NAME URL`, at any config level),
    or None when none is set: the shipped project has none, so a plain `make run` needs none."""
    from dvc.config import Config

    return Config(dvc_dir=str((root or project_root()) / ".dvc"))["core"].get("remote") or None


def transfer(direction: str, root: Path | None = None, remote: str | None = None,
             targets: list[str] | None = None) -> str:
    """`dvc push` / `dvc pull` (the default remote, or `remote`); returns DVC's summary line
    (e.g. "12 files pushed", "Everything is up to date.")."""
    if direction not in ("push", "pull"):
        raise ValueError(f"direction must be push or pull, not {direction!r}")
    root = root or project_root()
    proc = _dvc([direction, *(["-r", remote] if remote else []), *(targets or [])], root)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise DvcError(f"dvc {direction} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return out.splitlines()[-1] if out else ""


def status(root: Path | None = None, targets: list[str] | None = None) -> dict:
    """`dvc status --json [targets]`: {stage: [changes]} for every stage that is not up to date
    (of `targets` and the stages upstream of them, if given)."""
    root = root or project_root()
    proc = _dvc(["status", "--json", *(targets or [])], root)
    if proc.returncode != 0:
        raise DvcError(f"dvc status failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    text = proc.stdout.strip()
    return json.loads(text) if text else {}


if __name__ == "__main__":  # `python -m flows.dvc_runner repair`: what `make run` does before `dvc repro`
    if sys.argv[1:] != ["repair"]:
        sys.exit("usage: python -m flows.dvc_runner repair")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(repair_state(Path.cwd()) or "dvc state: ok")
