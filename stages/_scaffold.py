"""What every stage's `main()` shares: the command line, logging, params, and exit codes.

A stage module has `run(...)` (the work, through the `stunning` library; returns a summary)
and a `main(argv)` built from this module:

    def main(argv: list[str] | None = None) -> None:
        ap = parser(__doc__, "--data", "--out")         # --params and these, all required
        ap.add_argument("--device", default=None)       # options that are not paths
        run_stage("mystage", ap, argv,
                  run=lambda params, a: run(params, a.data, a.out, device=a.device),
                  summary=lambda s, a: print(f"done -> {a.out}"),
                  errors=(DataError,))

Paths have no defaults in code: `dvc.yaml` passes every one, so the command line of a stage
is written in one place. A user error (`ConfigError` plus the stage's `errors`) exits 2 with
`<stage>: <message>` on stderr and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from stunning.config import ConfigError, Params, load_params

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

T = TypeVar("T")
Errors = tuple[type[BaseException], ...]


def parser(doc: str | None, *paths: str) -> argparse.ArgumentParser:
    """A parser with `--params` and each of `paths` (e.g. `"--out"`) as required `Path` options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, required=True, help="params file (dvc.yaml passes params.yaml)")
    for flag in paths:
        ap.add_argument(flag, type=Path, required=True, help="path (dvc.yaml passes it)")
    return ap


def setup_logging(quiet: Iterable[str] = ()) -> None:
    """INFO logging in the stages' format (once per process); `quiet` loggers keep only warnings."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_stage(
    name: str,
    ap: argparse.ArgumentParser,
    argv: list[str] | None,
    run: Callable[[Params | None, argparse.Namespace], T],
    summary: Callable[[T, argparse.Namespace], Any],
    *,
    errors: Errors | Callable[[], Errors] = (),
    params: bool = True,
    quiet: Iterable[str] = (),
) -> T:
    """Parse `argv`, set up logging, load params, call `run(params, args)`, print `summary`.

    `errors` are the stage's user-facing error classes besides `ConfigError` (or a function
    returning them, to keep heavy imports out of `--help`); they exit 2 with the message.
    `params=False`: the stage reads no params file, `run` gets `None`.
    """
    args = ap.parse_args(argv)
    setup_logging(quiet)
    user_errors = (ConfigError, *(errors() if callable(errors) else errors))
    try:
        result = run(load_params(args.params) if params else None, args)
    except user_errors as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary(result, args)
    return result
