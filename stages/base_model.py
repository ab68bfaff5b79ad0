"""Stage `base_model` (phase 2, environment): make the base model available locally.

Builds the project's tiny embedded model into the output folder (`models/embedded`), the
default `base.path`. With `base.source: local`, `base.path` names the user's own diffusers
folder, which is checked here (never downloaded) so a missing model fails early.
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
    """Always build the embedded model (a few MB, seconds): it is the default base and the
    reference the tests use. With `base.source: local`, also check the user's folder."""
    from stunning.embedded import build_embedded
    from stunning.families.sd_unet import check_model_dir

    build_embedded(
        out,
        seed=params.base.seed,
        vae_steps=params.base.pretrain_vae_steps,
        unet_steps=params.base.pretrain_unet_steps,
        n_images=params.base.pretrain_images,
    )
    if params.base.source == "local":
        check_model_dir(Path(params.base.path))
    return {"source": params.base.source, "path": params.base.path}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("models/embedded"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        summary = run(params, args.out)
    except (ConfigError, ModelNotFoundError) as exc:
        print(f"base_model: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"base model ready: {summary['path']} ({summary['source']})")


if __name__ == "__main__":
    main()
