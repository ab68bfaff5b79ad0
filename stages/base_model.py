"""Stage `base_model` (phase 2, environment): make the base model available locally.

With `base.source: embedded` (the default) it installs the project's shipped micro model
(`stunning/assets/micro`, trained from scratch by `python -m stunning.pretrain`) into the
output folder (`models/embedded`), the default `base.path`. With `base.source: local`,
`base.path` names the user's own diffusers folder, which is checked here (never
downloaded) so a missing model fails early; the embedded model is still installed, as the
declared output and the reference the tests use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages._scaffold import parser, run_stage
from stunning.config import ConfigError
from stunning.families import ModelNotFoundError

log = logging.getLogger(__name__)


def run(params, out: Path) -> dict:
    from stunning.embedded import install_embedded
    from stunning.families import check_model_dir, get_family

    install_embedded(out)
    if params.base.source == "local":
        try:
            family = get_family(params.base.family)
        except KeyError as exc:
            raise ConfigError(f"base.family: {exc.args[0]}") from None
        check_model_dir(Path(params.base.path), family.required_components)
    return {"source": params.base.source, "path": params.base.path}


def _user_errors() -> tuple[type[Exception], ...]:
    from stunning.embedded import EmbeddedModelMissing

    return (ModelNotFoundError, EmbeddedModelMissing)


def main(argv: list[str] | None = None) -> None:
    run_stage(
        "base_model",
        parser(__doc__, "--out"),
        argv,
        run=lambda params, a: run(params, a.out),
        summary=lambda s, a: print(f"base model ready: {s['path']} ({s['source']})"),
        errors=_user_errors,
    )


if __name__ == "__main__":
    main()
