"""params.yaml validation: the shipped file loads; mistakes fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stunning.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.data.styles == ["impressionist", "noir"]
    assert params.validate_.seeds


def test_unknown_key_is_named(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["rnak"] = 8
    with pytest.raises(ConfigError, match=r"train\.rnak: unknown key"):
        load_params(_write(tmp_path, data))


def test_invalid_value_is_named(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["learning_rate"] = -1
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_params(_write(tmp_path, data))


def test_blend_of_unknown_style_is_rejected(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["merge"]["blends"][0]["weights"]["watercolour"] = 0.3
    with pytest.raises(ConfigError, match="watercolour"):
        load_params(_write(tmp_path, data))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_batch_size_auto_and_thermal_keys(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    shipped = load_params(REPO / "params.yaml").train
    assert shipped.batch_size == 4 and shipped.max_batch_size == 16 and shipped.thermal_check_every == 50
    data["train"]["batch_size"] = "auto"
    assert load_params(_write(tmp_path, data)).train.batch_size == "auto"
    data["train"]["batch_size"] = "lots"
    with pytest.raises(ConfigError, match=r"train\.batch_size.*whole number >= 1 or auto"):
        load_params(_write(tmp_path, data))
    data["train"]["batch_size"] = 4
    data["train"]["thermal_pause_s"] = 0
    with pytest.raises(ConfigError, match=r"train\.thermal_pause_s"):
        load_params(_write(tmp_path, data))


def test_code_defaults_are_the_shipped_params_key_by_key():
    """One source of truth: every section's model, built with no arguments, is params.yaml."""
    from stunning.config import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().model_dump(by_alias=True)
    shipped = load_params(REPO / "params.yaml").model_dump(by_alias=True)  # nested models normalised
    assert set(raw) == set(defaults), "sections of params.yaml vs Params"
    problems = []
    for section, fields in defaults.items():
        for key in sorted(set(fields) | set(raw[section])):
            if key not in raw[section]:
                problems.append(f"{section}.{key}: in the code (default {fields[key]!r}) but not in params.yaml")
            elif fields[key] != shipped[section][key]:
                problems.append(f"{section}.{key}: code default {fields[key]!r} != params.yaml {shipped[section][key]!r}")
    assert not problems, "\n".join(problems)


def test_removed_research_lora_rank_says_what_to_do(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["research"]["lora_rank"] = 4
    with pytest.raises(ConfigError, match=r"research: .*lora_rank was removed.*train\.rank"):
        load_params(_write(tmp_path, data))
