"""`stunning keys create | list | revoke` and `stunning serve --no-auth` off loopback."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stunning.cli import app


def test_keys_are_printed_once_listed_without_the_key_and_revoked(tmp_path):
    params = ["--params", str(tmp_path / "params.yaml")]  # keys live beside it: studio/keys.json
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "ci", *params])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("stn_") and (tmp_path / "studio/keys.json").is_file()

    listed = runner.invoke(app, ["keys", "list", "--json", *params])
    assert listed.exit_code == 0 and key not in listed.output
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "ci" and entry["last_used"] is None and set(entry) == {"id", "name", "created", "last_used"}

    revoked = runner.invoke(app, ["keys", "revoke", entry["id"], *params])
    assert revoked.exit_code == 0 and entry["id"] in revoked.output
    again = runner.invoke(app, ["keys", "revoke", entry["id"], *params])
    assert again.exit_code == 2 and "no API key with id" in again.output


def test_serve_without_auth_off_loopback_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--no-auth", "--host", "0.0.0.0", "--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2 and "refusing to serve 0.0.0.0 without authentication" in result.output
