"""Stage `base_model` (phase 2, environment): make the base model available locally.

With `base.source: embedded` (the default) it installs the project's shipped micro model
(`stunning/assets/micro`, trained from scratch by `python -m stunning.pretrain`) into the
output folder (`models/embedded`), the default `base.path`. With `base.source: local`,
`base.path` names the user's own diffusers folder, which is checked here (never
downloaded) so a missing model fails early; the embedded model is still installed, as the
declared output and the reference the tests use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stunning.config import ConfigError, load_params
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("models/embedded"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stunning.embedded import EmbeddedModelMissing

    try:
        params = load_params(args.params)
        summary = run(params, args.out)
    except (ConfigError, ModelNotFoundError, EmbeddedModelMissing) as exc:
        print(f"base_model: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"base model ready: {summary['path']} ({summary['source']})")


if __name__ == "__main__":
    main()
