"""The `stunning` command line: `stunning doctor | research | verify | ...`.

Each command is a thin shell around library code: it parses options, calls one library
function and renders the result. Heavy modules (torch, diffusers, mlflow) are imported
inside the command that needs them so `stunning --help` and `stunning verify` start fast.

Adding a command (e.g. `train`, `serve`): define a function decorated with
`@app.command()` in the "commands" section below, keep its body to option handling plus
one library call, import the library lazily inside it, and report user errors with
:func:`fail` (message on stderr, exit code 2) rather than a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="stunning",
    help="Stunning Engine: turn folders of photos into validated LoRA style models.",
    no_args_is_help=True,
    add_completion=False,
)

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error and exit (2: bad input/usage, 1: a check that failed)."""
    # soft_wrap: never break a path across lines, so it can be copied from the terminal.
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load_params(path: Path):
    from stunning.config import ConfigError, load_params

    try:
        return load_params(path)
    except ConfigError as exc:
        fail(str(exc))


# --------------------------------------------------------------------------- rendering


def _doctor_table(info: dict[str, Any]) -> Table:
    table = Table(title="stunning doctor", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value")
    plat = info["platform"]
    mem = info["memory"]
    table.add_row("device", f"[bold]{info['device']}[/] ({info['dtype']})")
    table.add_row("platform", f"{plat['platform']} ({plat['machine']})")
    table.add_row("python", plat["python"])
    table.add_row("CPUs", f"{plat['cpu_count']} logical, {plat.get('cpu_count_physical')} physical")
    table.add_row("memory", f"{mem['available_mb'] / 1024:.1f} GB free of {mem['total_mb'] / 1024:.1f} GB")
    cuda = info["cuda"]
    if cuda.get("available"):
        table.add_row(
            "CUDA",
            f"{cuda['device_name']} ({cuda['total_memory_mb'] / 1024:.1f} GB, sm {cuda['capability']}, "
            f"bf16 {'yes' if cuda['bf16_supported'] else 'no'}), CUDA {cuda['version']}",
        )
    else:
        table.add_row("CUDA", "not available")
    mps = info["mps"]
    if mps.get("available"):
        rec = mps.get("recommended_max_memory_mb")
        table.add_row("MPS", "available" + (f", recommended max {rec / 1024:.1f} GB" if rec else ""))
        for name, value in info.get("mps_env", {}).items():
            table.add_row(f"  {name}", value if value is not None else "[dim]unset[/]")
    else:
        table.add_row("MPS", "not available" + (" (built)" if mps.get("built") else ""))
    thermal = info.get("thermal")
    if thermal:
        detail = thermal["state"]
        if thermal.get("max_temp_c") is not None:
            detail += f", max {thermal['max_temp_c']:.0f} °C"
        if thermal.get("cpu_speed_limit_pct") is not None:
            detail += f", CPU speed limit {thermal['cpu_speed_limit_pct']}%"
        table.add_row("thermal", detail)
    else:
        table.add_row("thermal", "[dim]not reported by the OS[/]")
    for lib, version in info["libraries"].items():
        table.add_row(f"  {lib}", version or "[red]not installed[/]")
    return table


# --------------------------------------------------------------------------- commands


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="print the probe as JSON instead of a table")] = False,
) -> None:
    """Show the device, memory, thermal state and library versions this machine offers."""
    from stunning.device import probe

    info = probe()
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        console.print(_doctor_table(info))


@app.command()
def research(
    params: Annotated[Path, typer.Option("--params", help="params file")] = Path("params.yaml"),
    budget_gb: Annotated[
        float | None,
        typer.Option("--budget-gb", help="memory budget in GB (default: research.memory_budget_gb or the device's)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Size the candidate base models against this machine and print the fit table."""
    from stunning.config import ConfigError
    from stunning.device import probe
    from stunning.research import build_report, plan_summary, research_table

    p = _load_params(params)
    try:
        report = build_report(p.research, p.base, probe(), budget_gb=budget_gb, train=p.train)
    except ConfigError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
        return
    console.print(research_table(report))
    console.print(f"plan: {plan_summary(report)}")


@app.command()
def verify(
    bundle_dir: Annotated[Path, typer.Argument(help="a release bundle folder (dist/release)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check a release bundle against its SHA256SUMS: exit 1 listing what differs."""
    from stunning.bundle import verify_bundle

    if not bundle_dir.is_dir():
        fail(f"{bundle_dir} is not a folder; pass the release bundle folder (e.g. dist/release)")
    result = verify_bundle(bundle_dir)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif result.ok:
        console.print(f"[green]OK[/] {result.describe()}", highlight=False)
    else:
        err_console.print(result.describe(), highlight=False, markup=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind (other machines need an API key to generate)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    alias: Annotated[str, typer.Option(help="registry alias to serve (followed: a promotion or rollback is served without a restart)")] = "champion",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="no API keys (local use only: refused off loopback)")] = False,
    keys_file: Annotated[Path | None, typer.Option("--keys-file", help="API key file (default: <project>/studio/keys.json)")] = None,
    rate_per_minute: Annotated[float, typer.Option("--rate-per-minute", help="requests per minute per key (0: no limit)")] = 60.0,
    burst: Annotated[int, typer.Option(help="requests a key may make at once before the rate applies")] = 10,
    max_queue: Annotated[int, typer.Option("--max-queue", help="requests waiting to be drawn before 503")] = 16,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds", help="how often to check the alias for a new version (0: never)")] = 5.0,
) -> None:
    """Serve the registry's @champion over HTTP: POST /generate, /generate/stream (SSE); GET /health, /ready, /metrics, /docs."""
    import logging

    from stunning.config import ConfigError
    from stunning.serve import NO_AUTH_WARNING, ServeSettings, UnsafeBindError, check_bind, serve_command

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = ServeSettings(auth=not no_auth, keys_path=keys_file, rate_per_minute=rate_per_minute, burst=burst,
                                 max_pending=max_queue, poll_seconds=poll_seconds)
        check_bind(host, settings)
    except ValueError as exc:  # bad limits, or --no-auth off loopback (UnsafeBindError)
        fail(str(exc))
    if no_auth:
        err_console.print(f"[bold yellow]warning:[/] {NO_AUTH_WARNING.format(host=host, port=port)}", highlight=False)
    try:
        serve_command(host, port, params, alias, settings=settings)
    except (ConfigError, UnsafeBindError) as exc:
        fail(str(exc))


@app.command()
def studio(
    host: Annotated[str, typer.Option(help="interface to bind (off loopback, visitors sign in with an API key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 7860,
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    model: Annotated[str | None, typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the "
                                                   "registry's @champion, followed when it moves)")] = None,
    auth: Annotated[bool | None, typer.Option("--auth/--no-auth", help="sign in with an API key (default: off on "
                                              "loopback, required elsewhere; --no-auth only on loopback)")] = None,
    keys_file: Annotated[Path | None, typer.Option("--keys-file", help="API key file (default: <project>/studio/keys.json)")] = None,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds", help="how often to check the alias for a new version (0: never)")] = 5.0,
    out: Annotated[Path | None, typer.Option(help="keep result PNGs (with parameters) here (default: a temporary folder)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=100, help="initial denoising steps (default: validate.steps)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps (default: the best available)")] = None,
) -> None:
    """Open the style studio in the browser: style sliders with a live preview, saved blends, registry versions."""
    import logging

    from stunning.config import ConfigError
    from stunning.serve import UnsafeBindError
    from stunning.studio.app import StudioError, studio_command
    from stunning.studio.keys import KeyStoreError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if poll_seconds < 0:
        fail(f"--poll-seconds {poll_seconds}: use 0 (never) or more")
    try:
        studio_command(host, port, params, model_uri=model, device=device, auth=auth, keys_path=keys_file,
                       poll_seconds=poll_seconds, outputs_dir=out, steps=steps)
    except (StudioError, UnsafeBindError, ConfigError, KeyStoreError) as exc:
        fail(str(exc))


keys_app = typer.Typer(help="API keys for `stunning serve`: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_store(params: Path, keys_file: Path | None):
    from stunning.studio.keys import KeyStore, default_keys_path

    return KeyStore(keys_file or default_keys_path(params.resolve().parent))


_KEYS_PARAMS = typer.Option("--params", help="the project's params.yaml (its folder holds studio/keys.json)")
_KEYS_FILE = typer.Option("--keys-file", help="API key file (default: <project>/studio/keys.json)")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")] = "",
    params: Annotated[Path, _KEYS_PARAMS] = Path("params.yaml"),
    keys_file: Annotated[Path | None, _KEYS_FILE] = None,
) -> None:
    """Create a key and print it once (only its hash is stored: copy it now)."""
    from stunning.studio.keys import KeyStoreError

    try:
        record, key = _key_store(params, keys_file).create(name)
    except (KeyStoreError, OSError) as exc:
        fail(str(exc))
    err_console.print(f"created API key {record.id} ({name or 'no name'}); it is shown only now:", highlight=False)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    params: Annotated[Path, _KEYS_PARAMS] = Path("params.yaml"),
    keys_file: Annotated[Path | None, _KEYS_FILE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List keys: id, name, created, last used (never the key)."""
    from stunning.studio.keys import KeyStoreError

    try:
        keys = [k.public() for k in _key_store(params, keys_file).list()]
    except KeyStoreError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    table = Table(title="API keys", header_style="bold")
    for column in ("id", "name", "created", "last used"):
        table.add_column(column)
    for k in keys:
        table.add_row(k["id"], k["name"], k["created"], k["last_used"] or "never")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (see `stunning keys list`)")],
    params: Annotated[Path, _KEYS_PARAMS] = Path("params.yaml"),
    keys_file: Annotated[Path | None, _KEYS_FILE] = None,
) -> None:
    """Revoke a key: a running server refuses it from the next request."""
    from stunning.studio.keys import KeyStoreError

    try:
        record = _key_store(params, keys_file).revoke(key_id)
    except KeyStoreError as exc:
        fail(str(exc))
    console.print(f"revoked API key {record.id} ({record.name or 'no name'})", highlight=False)


_EXPECT_CHAMPION = typer.Option(
    "--expect-champion", min=0,
    help="act only if @champion still is this version (0: no champion); refused if another promotion or rollback "
         "moved it meanwhile (compare-and-set)",
)


def _expected(value: int | None) -> dict[str, int | None]:
    return {} if value is None else {"expected_champion": value or None}


@app.command()
def rollback(
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    reason: Annotated[str, typer.Option(help="why; recorded as a tag on the version")] = "manual rollback",
    expect_champion: Annotated[int | None, _EXPECT_CHAMPION] = None,
) -> None:
    """Move @champion back to @previous-champion."""
    from stunning.registry import RegistryError
    from stunning.registry import rollback as do_rollback

    p = _load_params(params)
    try:
        result = do_rollback(p.registry, root=params.resolve().parent, reason=reason, **_expected(expect_champion))
    except RegistryError as exc:
        fail(str(exc))
    console.print(result)


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="the registry version to make @champion")],
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    reason: Annotated[str, typer.Option(help="why; recorded as a tag on the version")] = "manual promotion",
    expect_champion: Annotated[int | None, _EXPECT_CHAMPION] = None,
) -> None:
    """Move @champion to VERSION (e.g. a `dvc exp run` candidate); its gate must have passed.

    The replaced champion stays as @previous-champion (`stunning rollback` undoes this)."""
    from stunning.registry import RegistryError
    from stunning.registry import promote as do_promote

    p = _load_params(params)
    try:
        result = do_promote(p.registry, version, root=params.resolve().parent, reason=reason,
                            **_expected(expect_champion))
    except RegistryError as exc:
        fail(str(exc))
    if result["promoted"]:
        prev = result["previous_champion_version"]
        console.print(f"PROMOTED v{version} to @champion" + (f" (previous v{prev} kept as @previous-champion)" if prev else ""))
    else:
        console.print("; ".join(result["reasons"]))


registry_app = typer.Typer(help="The MLflow tracking server and model registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("server")
def registry_server(
    backend_store_uri: Annotated[str, typer.Option("--backend-store-uri", help="the SQL database of runs and the "
                                                   "registry: sqlite:///PATH or postgresql+psycopg://USER:PW@HOST/DB")]
    = "sqlite:///mlruns/server/mlflow.db",
    artifacts_destination: Annotated[str, typer.Option("--artifacts-destination", help="where the server keeps "
                                                       "artifacts (a folder, or s3://...)")] = "mlruns/server/artifacts",
    host: Annotated[str, typer.Option(help="interface to bind (0.0.0.0: the whole network; put it behind auth)")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 5000,
    workers: Annotated[int | None, typer.Option(help="server worker processes (default: MLflow's)")] = None,
) -> None:
    """Run a shared MLflow tracking server with served artifacts (`mlflow server --serve-artifacts`).

    Point every machine at it with `registry.tracking_uri: http://HOST:PORT` in params.yaml."""
    import os
    import shlex

    from stunning.mlflow_server import server_command, server_uri

    try:
        cmd = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    except ValueError as exc:
        fail(str(exc))
    if backend_store_uri.startswith("sqlite:///"):
        Path(cmd[cmd.index("--backend-store-uri") + 1].removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    err_console.print(f"registry.tracking_uri: {server_uri(host, port)}", highlight=False, soft_wrap=True)
    err_console.print(f"$ {shlex.join(cmd)}", highlight=False, soft_wrap=True)
    os.execv(cmd[0], cmd)  # the server in the foreground: Ctrl+C stops it


def _batch_size(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        fail(f"--batch-size {value!r}: use auto or a whole number of images >= 1")
    return n


def _default(key: str) -> str:
    """` (default: X)` for a train option's help: the one-off run's default, read from the library."""
    import dataclasses

    from stunning.oneoff import OneOffOptions, oneoff_default

    options = {f.name: f.default for f in dataclasses.fields(OneOffOptions)}
    return f" (default: {options[key] if key in options and options[key] is not None else oneoff_default(key)})"


@app.command()
def train(
    model: Annotated[str, typer.Option(help="base model: a diffusers folder, a .safetensors checkpoint, or a "
                                            "Hugging Face id already in the local cache (org/name)")],
    data: Annotated[Path, typer.Option(help="folder of photos (one style), or one sub-folder per style; "
                                            "captions in same-name .txt files or metadata.jsonl")],
    prompt: Annotated[str | None, typer.Option(help="caption of every image without one, e.g. "
                                                    "'a photo in sks style' (the instance prompt)")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="training size in pixels (default: the model's "
                                                               "own)")] = None,
    batch_size: Annotated[str | None, typer.Option("--batch-size", help="images per step, or auto (the largest "
                                                   "that fits in memory)" + _default("batch_size"))] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="optimizer steps" + _default("steps"))] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA rank (alpha = rank)" + _default("rank"))] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="learning rate" + _default("learning_rate"))] = None,
    family: Annotated[str | None, typer.Option(help="model family (default: detected from the model)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (adapters, summary.json, .work/ for resuming)"
                                                  + _default("out"))] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps (default: the best available)")] = None,
    style: Annotated[str | None, typer.Option(help="style name (default: the folder's name)")] = None,
    trigger: Annotated[list[str] | None, typer.Option(help="trigger word(s), recorded in the adapter")] = None,
    class_prompt: Annotated[str | None, typer.Option("--class-prompt", help="DreamBooth prior preservation: "
                                                     "train with base-model images of this class too, e.g. "
                                                     "'a photo'")] = None,
    export: Annotated[list[str] | None, typer.Option(help="also write the adapter in this layout: kohya "
                                                          "(webui/kohya/ComfyUI) or comfyui")] = None,
    mlflow: Annotated[bool, typer.Option("--mlflow", help="track the run in MLflow (<out>/mlruns)")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint in <out>/.work")] = True,
    config: Annotated[Path | None, typer.Option(help="YAML file of further train settings (params.yaml's "
                                                     "train: keys, e.g. lr_scheduler, ema_decay); options given "
                                                     "on the command line win over its keys")] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help="for a single-file checkpoint: a "
                                                     "diffusers folder or cached id of its architecture")] = None,
) -> None:
    """Train a LoRA adapter from a folder of photos, outside the pipeline (resumable)."""
    import logging

    import yaml

    from stunning.oneoff import OneOffOptions, train_oneoff
    from stunning.training.batch import BatchSizeError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if config is not None:
        try:
            overrides = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            fail(f"--config {config}: cannot read it as YAML ({exc})")
        if not isinstance(overrides, dict):
            fail(f"--config {config}: expected a mapping of train settings (e.g. `lr_scheduler: cosine`)")
        overrides = overrides.get("train", overrides)
        if not isinstance(overrides, dict):
            fail(f"--config {config}: its train: section must be a mapping of train settings")
    # Options left out are None: an option typed on the command line beats the file, the file
    # beats the defaults (stunning.oneoff.train_config).
    if class_prompt:
        overrides = {**overrides, "class_prompt": class_prompt, "prior_preservation": True}
    opts = OneOffOptions(
        model=model, data=data, prompt=prompt, resolution=resolution, batch_size=_batch_size(batch_size),
        steps=steps, rank=rank, learning_rate=lr, family=family, device=device, style=style, trigger=trigger or [],
        mlflow=mlflow, resume=resume, formats=export or [], config_overrides=overrides, model_config=model_config,
        **({"out": out} if out is not None else {}),
    )
    out = opts.out
    try:
        summary = train_oneoff(opts, echo=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        fail(f"interrupted. Run the same command again to continue from the last checkpoint in {out / '.work'} "
             "(--no-resume starts over)", code=130)
    # The library's bad-input errors are ValueErrors (OneOffError, ConfigError, DataError,
    # DatasetError, a device or precision the machine lacks) or FileNotFoundErrors (the model).
    except (ValueError, FileNotFoundError, BatchSizeError) as exc:
        fail(str(exc))
    table = Table(title="stunning train", header_style="bold")
    for col in ("style", "images", "steps", "final loss", "steps/s", "batch", "peak memory", "device"):
        table.add_column(col)
    for name, r in summary["styles"].items():
        rate = "resumed, none run" if r["steps_per_s"] is None else f"{r['steps_per_s']:.2f}"
        table.add_row(name, str(r["images"]), str(r["steps"]), f"{r['final_loss']:.4f}", rate, str(r["batch_size"]),
                      f"{r['peak_memory_mb']:.0f} MB", f"{r['device']} ({r['mixed_precision']})")
    console.print(table)
    for name, r in summary["styles"].items():  # whole paths, outside the table, so they can be copied
        for layout, path in {"diffusers": r["adapter"], **r["exports"]}.items():
            console.print(f"adapter {name} ({layout}): {path}", highlight=False, soft_wrap=True)
    if summary.get("mlflow_tracking_uri"):
        console.print(f"MLflow: {summary['mlflow_tracking_uri']}", highlight=False, soft_wrap=True)
    console.print(f"summary: {out / 'summary.json'}", highlight=False, soft_wrap=True)


@app.command("model-path")
def model_path(
    ref: Annotated[str, typer.Argument(help="a diffusers folder, a cached Hugging Face id (org/name[@rev]) or a "
                                            "single-file checkpoint")],
    family: Annotated[str | None, typer.Option(help="model family (needed for single files)")] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help="for a single file: a folder or "
                                                     "cached id of its architecture")] = None,
) -> None:
    """Print the local diffusers folder of a base model (for base.path in params.yaml)."""
    from stunning.families import ModelNotFoundError
    from stunning.model_source import resolve_base

    try:
        folder = resolve_base(ref, family, config=model_config)
    except (ModelNotFoundError, KeyError) as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    typer.echo(str(folder))


@app.command("export-checkpoint")
def export_checkpoint(
    folder: Annotated[Path, typer.Argument(help="a diffusers model folder, e.g. the merge stage's models/merged/fused")],
    out: Annotated[Path, typer.Argument(help="the .safetensors file to write")],
    family: Annotated[str | None, typer.Option(help="model family (default: read from the folder)")] = None,
    vae: Annotated[bool, typer.Option(help="sd3 only: include the VAE (--no-vae: a diffusion-model-only file)")] = True,
) -> None:
    """Write a model folder as one original-layout checkpoint (AUTOMATIC1111/Forge, ComfyUI)."""
    from stunning.families import ModelNotFoundError
    from stunning.model_source import detect_family
    from stunning.single_file import export_single_file

    if out.suffix != ".safetensors":
        fail(f"{out}: name the output file *.safetensors")
    try:
        written = export_single_file(folder, out, family or detect_family(folder), vae=vae)
    except (ModelNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(str(written))


@app.command("convert-lora")
def convert_lora(
    src: Annotated[Path, typer.Argument(help="a LoRA file in the diffusers layout (what training writes)")],
    layout: Annotated[str, typer.Option(help="kohya (webui, kohya tools), comfyui, or diffusers")] = "kohya",
    family: Annotated[str | None, typer.Option(help="model family (default: the file's stunning.family)")] = None,
    out: Annotated[Path | None, typer.Option(help="output file (default: <src stem>-<layout>.safetensors)")] = None,
) -> None:
    """Write a trained adapter in another tool's key layout (kohya/webui, ComfyUI)."""
    from safetensors import SafetensorError, safe_open

    from stunning.lora_formats import convert_lora_file

    if not src.is_file():
        fail(f"{src}: no such file; pass the adapter's pytorch_lora_weights.safetensors")
    if family is None:
        try:
            with safe_open(str(src), framework="pt") as f:
                family = (f.metadata() or {}).get("stunning.family")
        except SafetensorError as exc:
            fail(f"{src}: not a safetensors file ({exc})")
        if family is None:
            fail(f"{src} does not record its model family; pass --family (sd-unet, sdxl, sd3 or flux)")
    dst = out or src.with_name(f"{src.stem}-{layout}.safetensors")
    try:
        convert_lora_file(src, dst, layout, family)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"wrote {dst} ({layout} layout, family {family})", highlight=False, soft_wrap=True)


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="prompt(s); or use --prompts FILE")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompts", help="a text file, one prompt per line")] = None,
    style: Annotated[list[str] | None, typer.Option("--style", help="NAME=WEIGHT (repeatable): blend the "
                                                    "model's styles at request time, e.g. --style noir=0.7")] = None,
    blend: Annotated[str | None, typer.Option(help="a saved studio blend (studio/blends/NAME.yaml) or a blend "
                                                   "registered with the model")] = None,
    negative: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    seed: Annotated[int, typer.Option(min=0, help="first seed; images use seed, seed+1, ...")] = 0,
    count: Annotated[int, typer.Option(min=1, help="images per prompt")] = 1,
    steps: Annotated[int, typer.Option(min=1, max=200, help="denoising steps")] = 20,
    guidance: Annotated[float, typer.Option(min=0.0, max=50.0, help="classifier-free guidance scale")] = 4.0,
    sampler: Annotated[str | None, typer.Option(help="a sampler of the model's family (default: its own)")] = None,
    model: Annotated[str | None, typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION "
                                                   "(default: the registry's @champion)")] = None,
    out: Annotated[Path, typer.Option(help="output folder (PNGs + index.jsonl; rerunning resumes)")] = Path("outputs"),
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps (default: the best available)")] = None,
) -> None:
    """Generate PNGs with the registry's model: parameters embedded (A1111 `parameters` chunk),
    an index.jsonl beside them; rerunning skips images already done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stunning.config import ConfigError
    from stunning.studio.blends import blends_dir
    from stunning.studio.generate import (
        GenerateError,
        GenerateSpec,
        apply_blend,
        generate_to_folder,
        load_model,
        parse_style_args,
        plan_requests,
        read_prompts,
    )

    try:
        if style and blend:
            raise GenerateError("give --style or --blend, not both")
        spec = GenerateSpec(prompts=read_prompts(prompts or [], prompt_file), styles=parse_style_args(style or []),
                            negative_prompt=negative, seed=seed, count=count, steps=steps, guidance_scale=guidance,
                            sampler=sampler)
        plan_requests(spec)  # bad limits fail before the model loads
        with console.status("loading the model"):
            loaded = load_model(model, params, device=device)
        if blend:
            spec = apply_blend(spec, blend, loaded, blends_dir(params.resolve().parent))
        requests = plan_requests(spec)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console) as bar:
            images = bar.add_task("images", total=len(requests))
            steps_task = bar.add_task("steps", total=spec.steps)
            summary = generate_to_folder(
                loaded, requests, out,
                on_image=lambda done, total, rec, skipped: (bar.update(images, completed=done),
                                                            bar.reset(steps_task, total=spec.steps)),
                on_step=lambda step, total: bar.update(steps_task, completed=step, total=total),
            )
    except (GenerateError, ConfigError) as exc:
        fail(str(exc))
    per = f", {summary['seconds_per_image']} s/image" if summary["seconds_per_image"] else ""
    console.print(f"{summary['generated']} generated, {summary['skipped']} already there -> {summary['out_dir']} "
                  f"({summary['model']} v{summary['model_version']}{per})", highlight=False, soft_wrap=True)


negatives_app = typer.Typer(help="Negative prompts that measurably help a style or blend.", no_args_is_help=True)
app.add_typer(negatives_app, name="negatives")


@negatives_app.command("optimize")
def negatives_optimize(
    prompts: Annotated[Path, typer.Option("--prompts", help="text file, one prompt a line (half searched on, "
                                          "half held out for the before/after)")],
    style: Annotated[str | None, typer.Option(help="a trained style (models/adapters/<style>)")] = None,
    blend: Annotated[str | None, typer.Option(help="a blend named in params.yaml merge.blends")] = None,
    blend_weights: Annotated[str | None, typer.Option("--blend-weights", help="an unnamed blend, e.g. "
                                                      "impressionist=0.5,noir=0.5")] = None,
    seeds: Annotated[str, typer.Option(help="fixed seeds, comma-separated")] = "0,1",
    vocab: Annotated[Path | None, typer.Option(help="extra candidate terms, one a line")] = None,
    out: Annotated[Path | None, typer.Option(help="report folder (default reports/negatives/<target>)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="sampling steps (default validate.steps)")] = None,
    budget: Annotated[int, typer.Option(min=1, help="most candidates scored on the search prompts")] = 12,
    save: Annotated[bool, typer.Option(help="store a winner as the default negative (studio/negatives.yaml)")] = True,
    params: Annotated[Path, typer.Option("--params", help="the project's params.yaml")] = Path("params.yaml"),
    base: Annotated[Path | None, typer.Option(help="base model folder (default base.path)")] = None,
    adapters: Annotated[Path, typer.Option(help="trained adapters folder")] = Path("models/adapters"),
    data: Annotated[Path, typer.Option(help="curated data (the style references)")] = Path("data/curated"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps (default: the best available)")] = None,
) -> None:
    """Search a negative prompt for a style/blend; report before/after on held-out prompts."""
    from stunning.studio.negatives import NegativesInputError, parse_weights, read_vocabulary, run

    p = _load_params(params)
    try:
        weights = parse_weights(blend_weights) if blend_weights else None
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        target = style or blend or (blend_weights or "").replace("=", "-").replace(",", "_")
        report, saved = run(
            p, prompts=read_vocabulary(prompts), out_dir=out or Path("reports/negatives") / target, style=style,
            blend=blend, weights=weights, seeds=seed_list, vocabulary_file=vocab, base=base, adapters_dir=adapters,
            data_dir=data, steps=steps, max_candidates=budget, save=save, root=params.resolve().parent,
            device=device, progress=lambda m: err_console.print(f"[dim]{m}[/]", highlight=False),
        )
    except (NegativesInputError, ValueError) as exc:
        fail(str(exc))
    console.print(f"{report.target.key}: {report.verdict}"
                  + (f" with {report.best!r} {report.improvement()}" if report.verdict == "improvement" else ""),
                  highlight=False, soft_wrap=True)
    console.print(f"report: {(out or Path('reports/negatives') / target) / 'negatives.md'}", highlight=False, soft_wrap=True)
    if saved:
        console.print(f"saved as the default negative prompt of {report.target.key} in {saved}", highlight=False,
                      soft_wrap=True)


blends_app = typer.Typer(help="Saved request-time blends (studio/blends/*.yaml): list, save, delete, promote.",
                         no_args_is_help=True)
app.add_typer(blends_app, name="blends")
_BLENDS_PARAMS = typer.Option("--params", help="the project's params.yaml (its folder holds studio/blends/)")


@blends_app.command("list")
def blends_list(params: Annotated[Path, _BLENDS_PARAMS] = Path("params.yaml")) -> None:
    """The saved blends with their weights and negative prompt."""
    from stunning.studio.blends import BlendFileError, blends_dir, list_blends

    try:
        saved = list_blends(blends_dir(params.resolve().parent))
    except BlendFileError as exc:
        fail(str(exc))
    table = Table(title="saved blends", header_style="bold")
    for column in ("name", "weights", "negative prompt"):
        table.add_column(column)
    for b in saved:
        table.add_row(b.name, ", ".join(f"{k}={v:g}" for k, v in b.weights.items()), b.negative_prompt or "")
    console.print(table)


@blends_app.command("save")
def blends_save(
    name: Annotated[str, typer.Argument(help="the blend's name (letters, digits, - and _)")],
    style: Annotated[list[str], typer.Option("--style", help="NAME=WEIGHT, repeatable (weights in [-2, 2])")],
    negative: Annotated[str | None, typer.Option(help="the blend's negative prompt")] = None,
    params: Annotated[Path, _BLENDS_PARAMS] = Path("params.yaml"),
) -> None:
    """Save (or replace) a named blend, as the studio's "save blend" does."""
    from stunning.studio.blends import BlendFileError, SavedBlend, blends_dir, save_blend
    from stunning.studio.generate import GenerateError, parse_style_args

    try:
        weights = parse_style_args(style) or {}
        path = save_blend(SavedBlend(name, weights, negative), blends_dir(params.resolve().parent))
    except (BlendFileError, GenerateError) as exc:
        fail(str(exc))
    console.print(f"saved blend {name!r} -> {path}", highlight=False, soft_wrap=True)


@blends_app.command("delete")
def blends_delete(
    name: Annotated[str, typer.Argument(help="the saved blend's name")],
    params: Annotated[Path, _BLENDS_PARAMS] = Path("params.yaml"),
) -> None:
    """Delete a saved blend."""
    from stunning.studio.blends import BlendFileError, blends_dir, delete_blend

    try:
        if not delete_blend(name, blends_dir(params.resolve().parent)):
            fail(f"no saved blend named {name!r} (see `stunning blends list`)")
    except BlendFileError as exc:
        fail(str(exc))
    console.print(f"deleted blend {name!r}", highlight=False)


@blends_app.command("promote")
def blends_promote(
    name: Annotated[str, typer.Argument(help="the saved blend's name")],
    params: Annotated[Path, _BLENDS_PARAMS] = Path("params.yaml"),
) -> None:
    """Add the saved blend to params.yaml's merge.blends: the next `dvc repro` merges, validates,
    registers and bundles it in dist/release like the pipeline's own blends."""
    from stunning.studio.blends import BlendFileError, blends_dir, promote_to_params

    try:
        result = promote_to_params(name, params, blends_dir(params.resolve().parent))
    except BlendFileError as exc:
        fail(str(exc))
    verb = "replaced" if result.get("replaced") else "added"
    console.print(f"{verb} blend {name!r} in {params} merge.blends; run `dvc repro` to build, validate and bundle it",
                  highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- export (ONNX, Core ML)

export_app = typer.Typer(help="Export a model folder's denoiser for deployment: ONNX, Core ML.", no_args_is_help=True)
app.add_typer(export_app, name="export")

_EXPORT_MODEL = typer.Option("--model", help="a diffusers model folder: the fused model (models/merged/fused) or a base")
_EXPORT_FAMILY = typer.Option(help="model family (default: read from model_index.json)")
_EXPORT_BATCH = typer.Option(help="images per call the fixed shapes are made for")
_EXPORT_GUIDANCE = typer.Option("--guidance-scale", help="guidance of the sampler (>1 doubles the batch)")
_EXPORT_HINT = ("pass a diffusers model folder with --model: the fused model `dvc repro merge` writes "
                "(models/merged/fused), a base model folder, or stunning/assets/micro")


def _export_call(model: Path, family: str | None, run) -> dict:
    """Run an exporter, turning a bad folder/family/option into exit 2 with the fix."""
    from stunning.export import ExportError
    from stunning.families import ModelNotFoundError, get_family

    if not model.is_dir():
        fail(f"{model} is not a folder; {_EXPORT_HINT}")
    if family is not None:
        try:
            get_family(family)
        except KeyError as exc:
            fail(f"--family: {exc.args[0]}")
    try:
        return run()
    except ModelNotFoundError as exc:
        fail(f"{exc} ({_EXPORT_HINT})")
    except ExportError as exc:
        fail(f"{model}: {exc}")


def _export_io_table(report: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("", "name", "shape", "dtype"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for item in report[kind]:
            table.add_row(kind[:-1], item["name"], "x".join(str(d) for d in item["shape"]), item["dtype"])
    return table


@export_app.command("onnx")
def export_onnx_cmd(
    model: Annotated[Path, _EXPORT_MODEL],
    out: Annotated[Path, typer.Option("--out", help="output folder: denoiser.onnx [+ .data] and export.json")],
    family: Annotated[str | None, _EXPORT_FAMILY] = None,
    batch: Annotated[int, _EXPORT_BATCH] = 1,
    guidance_scale: Annotated[float, _EXPORT_GUIDANCE] = 4.0,
    exporter: Annotated[str, typer.Option(help="dynamo (torch.export, default) or torchscript (legacy tracer)")] = "dynamo",
    external_data: Annotated[bool | None, typer.Option("--external-data/--single-file", help="weights in denoiser.onnx.data (default: only above 1 GiB)")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="check with ONNX Runtime: max abs error and image PSNR vs torch")] = True,
    steps: Annotated[int, typer.Option(help="sampling steps of the image check")] = 8,
) -> None:
    """Export the denoiser to ONNX with fixed shapes and check it against torch with ONNX Runtime."""
    from stunning.export.onnx import export_onnx

    r = _export_call(model, family, lambda: export_onnx(
        model, out, family=family, batch=batch, guidance_scale=guidance_scale, exporter=exporter,
        external_data=external_data, verify=verify, steps=steps))
    console.print(_export_io_table(r, f"{r['family']} {r['component']} -> {r['path']}"))
    line = f"{r['bytes'] / 1e6:.2f} MB ({', '.join(r['files'])}), opset {r['opset']}, {r['exporter']} exporter"
    if verify:
        psnr = "identical images" if r["psnr_db_min"] is None else f"min PSNR {r['psnr_db_min']:.1f} dB"
        line += f"; max abs error {r['max_abs_error']:.2e}; {psnr} ({r['identical_images']}/{len(r['images'])} identical)"
    console.print(line, highlight=False, soft_wrap=True)


@export_app.command("coreml")
def export_coreml_cmd(
    model: Annotated[Path, _EXPORT_MODEL],
    out: Annotated[Path, typer.Option("--out", help="output folder: <part>.mlpackage, <part>-<n>bit.mlpackage, export.json")],
    family: Annotated[str | None, _EXPORT_FAMILY] = None,
    batch: Annotated[int, _EXPORT_BATCH] = 1,
    guidance_scale: Annotated[float, _EXPORT_GUIDANCE] = 4.0,
    nbits: Annotated[list[int] | None, typer.Option("--nbits", help="palettization bit widths (repeat; default 8, 6, 4)")] = None,
    mode: Annotated[str, typer.Option(help="palettization: kmeans (better, minutes) or uniform (seconds)")] = "kmeans",
    precision: Annotated[str, typer.Option(help="float weights of the package: float16 (Neural Engine) or float32")] = "float16",
    component: Annotated[list[str] | None, typer.Option("--component", help="only these parts (repeat): denoiser, vae_decoder, vae_encoder, text_encoder, text_encoder_2")] = None,
    resolution: Annotated[int | None, typer.Option(help="image size the shapes are fixed for (default: the model's)")] = None,
) -> None:
    """Convert the model's parts to Core ML packages, palettize them, and compare every palettized layer with torch."""
    from stunning.export.coreml import DEFAULT_NBITS, export_coreml

    r = _export_call(model, family, lambda: export_coreml(
        model, out, family=family, batch=batch, guidance_scale=guidance_scale, nbits=tuple(nbits or DEFAULT_NBITS),
        mode=mode, precision=precision, components=component, resolution=resolution))
    table = Table(title=f"{r['family']} -> {r['path']}: {r['palettization']['mode']} palettization per tensor vs torch")
    for col in ("package", "inputs", "MB", "palettized layers", "mean rel. RMS error", "max rel. RMS error"):
        table.add_column(col)
    for part in r["components"].values():
        ins = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))}" for i in part["inputs"])
        for w in part["packages"].values():
            table.add_row(w["package"], ins, f"{w['bytes'] / 1e6:.2f}", str(w["palettized_layers"]),
                          *(f"{w[k]:.4f}" if w.get(k) is not None else "n/a (no layer matched)"
                            for k in ("rel_rms_error_mean", "rel_rms_error_max")))
    console.print(table)
    first = next(iter(r["components"].values()))["prediction"]
    console.print(f"prediction: {first.get('skipped') or first}", highlight=False, soft_wrap=True)


# Further commands follow the pattern above: options -> one lazily imported library call ->
# rendering; user errors via fail().


def main() -> None:  # pragma: no cover - console-script entry point alternative
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
