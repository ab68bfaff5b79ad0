"""Stage `champion` (phase 7, validation): the registry's `@champion` as a file DVC can see.

Reads the MLflow registry (`registry`) and writes `--out` (`reports/champion.json`):
`{"model_name", "version", "content_hash", "metrics", "adapters"}` of the champion the
candidate in `--adapters` is compared with — deterministic, no timestamps, so the file
changes only when that champion does. `dvc.yaml` runs it every time (`always_changed`)
and `validate` depends on its output: promoting or rolling back outside the pipeline
(`stunning promote`, `stunning rollback`) reruns the validation against the new champion.
When the candidate itself is `@champion` (just promoted), the record is of the champion it
replaced, which it was validated against; so a promotion does not re-validate its own
candidate. Without a registry the record has `"version": null`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages._scaffold import parser, run_stage
from stunning.config import Params

log = logging.getLogger(__name__)


def run(params: Params, adapters: Path, out: Path, root: Path | None = None) -> dict[str, Any]:
    """Write the champion record to `out` (only when its content changed); return it."""
    from stunning.io import read_json, write_json
    from stunning.registry import champion_record, content_hash

    record = champion_record(params.registry, root=root, candidate_hash=content_hash(adapters))
    out = Path(out)
    if not out.is_file() or read_json(out) != record:
        write_json(out, record)
    return record


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.registry import RegistryError

    return (RegistryError,)


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "champion",
        parser(__doc__, "--adapters", "--out"),
        argv,
        run=lambda params, a: run(params, a.adapters, a.out),
        summary=lambda r, a: print(
            f"champion: {r['model_name']}@champion "
            + (f"v{r['version']} ({len(r['metrics'])} metrics)" if r["version"] is not None else "none yet")
            + f" -> {a.out}"
        ),
        errors=_user_errors,
    )


if __name__ == "__main__":
    main()
