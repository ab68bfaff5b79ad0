"""The `stunning` CLI: doctor, research and verify, through typer's test runner."""

from __future__ import annotations

import json
import os

import numpy as np
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from stunning.bundle import build_bundle
from stunning.cli import app
from stunning.config import Params, TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

runner = CliRunner()


def _bundle(tmp_path):
    params = Params()
    adapters, blends, card = tmp_path / "adapters", tmp_path / "blends", tmp_path / "card"
    for folder in [adapters / s for s in params.data.styles] + [blends / b.name for b in params.merge.blends]:
        folder.mkdir(parents=True)
        save_file({"w": np.zeros((2, 2), np.float32)}, str(folder / "pytorch_lora_weights.safetensors"))
    card.mkdir()
    (card / "README.md").write_text("# card\n")
    out = tmp_path / "release"
    build_bundle(out, adapters, blends, card, params)
    return out


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "research", "verify"):
        assert command in result.output


def test_doctor_json_parses():
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["device"] in ("cpu", "cuda", "mps") and "torch" in info["libraries"]


def test_doctor_table():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "device" in result.output and "diffusers" in result.output


def test_verify_exit_codes(tmp_path):
    out = _bundle(tmp_path)
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output

    (out / "README.md").write_text("# edited\n")
    (out / "blends.yaml").unlink()
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 1
    assert "changed:    README.md" in bad.output and "missing:    blends.yaml" in bad.output

    as_json = runner.invoke(app, ["verify", "--json", str(out)])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["changed"] == ["README.md"]

    missing = runner.invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a folder" in missing.output


def _config_only_model(root):
    """A diffusers folder with only configs: all `research` reads."""
    configs = {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 8,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "cross_attention_dim": 16,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 8,
        },
    }
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({k: ["diffusers", v["_class_name"]] for k, v in configs.items()}))
    for name, cfg in configs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def test_research_command(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"research": {"candidates": []}, "base": {"source": "local", "path": str(tmp_path / "absent")}})
    )
    result = runner.invoke(app, ["research", "--params", str(params)])
    assert result.exit_code == 2 and "base.path" in result.output  # the base folder does not exist

    model = _config_only_model(tmp_path / "model")
    params.write_text(
        yaml.safe_dump(
            {
                "research": {"candidates": [{"name": "mine", "path": str(model)}]},
                "base": {"source": "local", "path": str(model)},
            }
        )
    )
    result = runner.invoke(app, ["research", "--params", str(params), "--budget-gb", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["budget_gb"] == 64 and report["plan"]["candidate"] == "mine"
    table = runner.invoke(app, ["research", "--params", str(params), "--budget-gb", "64"])
    assert table.exit_code == 0, table.output
    assert "mine" in table.output and "plan:" in table.output
    # The adapter sized is the params' train section's (shipped defaults when it is left out).
    assert report["lora_rank"] == TrainConfig().rank and report["lora_targets"] == TrainConfig().target_modules
    params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()),
                                      "train": {"rank": 2, "target_modules": ["to_q"]}}))
    small = json.loads(runner.invoke(app, ["research", "--params", str(params), "--budget-gb", "64", "--json"]).stdout)
    assert small["lora_rank"] == 2 and small["candidates"][0]["lora"]["targets"] == ["to_q"]
    assert 0 < small["candidates"][0]["lora"]["params"] < report["candidates"][0]["lora"]["params"]


def test_research_bad_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("research:\n  lora_rnak: 4\n")
    result = runner.invoke(app, ["research", "--params", str(params)])
    assert result.exit_code == 2 and "research.lora_rnak" in result.output
