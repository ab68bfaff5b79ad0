"""Device probe: thermal parsers on captured outputs, device/dtype choice, peak memory."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stunning import device as dev  # noqa: E402
from tests.factories import PMSET_APPLE_SILICON, PMSET_NOMINAL, PMSET_THROTTLED  # noqa: E402


def test_pmset_nominal_intel():
    t = dev.parse_pmset_therm(PMSET_NOMINAL)
    assert t["state"] == "nominal"
    assert t["cpu_speed_limit_pct"] == 100
    assert t["cpu_available_cpus"] == 12
    assert t["thermal_warning_level"] is None


def test_pmset_nominal_apple_silicon_notes_only():
    t = dev.parse_pmset_therm(PMSET_APPLE_SILICON)
    assert t["state"] == "nominal"
    assert t["cpu_speed_limit_pct"] is None


def test_pmset_throttled():
    t = dev.parse_pmset_therm(PMSET_THROTTLED)
    assert t["state"] == "throttled"
    assert t["cpu_speed_limit_pct"] == 35
    assert t["thermal_warning_level"] == 2


def test_pmset_speed_limit_alone_means_throttled():
    text = PMSET_NOMINAL.replace("CPU_Speed_Limit \t= 100", "CPU_Speed_Limit \t= 58")
    assert dev.parse_pmset_therm(text)["state"] == "throttled"


def test_pmset_garbage_is_unknown():
    assert dev.parse_pmset_therm("pmset: command failed")["state"] == "unknown"


# Captured /sys/class/thermal contents of a laptop (Intel, ACPI + package sensor).
LINUX_ZONES = {
    "thermal_zone0": {
        "type": "acpitz\n",
        "temp": "27800\n",
        "trip_point_0_type": "critical\n",
        "trip_point_0_temp": "119000\n",
    },
    "thermal_zone1": {"type": "INT3400 Thermal\n", "temp": "20000\n"},
    "thermal_zone2": {
        "type": "x86_pkg_temp\n",
        "temp": "48000\n",
        "trip_point_0_type": "passive\n",
        "trip_point_0_temp": "90000\n",
        "trip_point_1_type": "critical\n",
        "trip_point_1_temp": "100000\n",
    },
    "thermal_zone10": {"type": "iwlwifi_1\n", "temp": ""},  # sensor off: no reading
}


def test_linux_zones_nominal():
    t = dev.parse_linux_thermal(LINUX_ZONES)
    assert t["state"] == "nominal"
    assert t["max_temp_c"] == pytest.approx(48.0)
    assert [z["zone"] for z in t["zones"]] == ["thermal_zone0", "thermal_zone1", "thermal_zone2"]
    pkg = t["zones"][2]
    assert pkg["type"] == "x86_pkg_temp" and pkg["hot_c"] == 90.0 and pkg["critical_c"] == 100.0


def test_linux_zone_over_passive_trip_is_hot_and_over_critical_is_critical():
    zones = {k: dict(v) for k, v in LINUX_ZONES.items()}
    zones["thermal_zone2"]["temp"] = "93000"
    assert dev.parse_linux_thermal(zones)["state"] == "hot"
    zones["thermal_zone2"]["temp"] = "101000"
    t = dev.parse_linux_thermal(zones)
    assert t["state"] == "critical" and t["max_temp_c"] == pytest.approx(101.0)


def test_linux_zone_without_trips_uses_default_thresholds():
    assert dev.parse_linux_thermal({"thermal_zone0": {"type": "cpu", "temp": "86000"}})["state"] == "hot"
    assert dev.parse_linux_thermal({})["state"] == "unknown"


def test_read_linux_thermal_from_sysfs_tree(tmp_path):
    for name, files in LINUX_ZONES.items():
        (tmp_path / name).mkdir()
        for fname, content in files.items():
            (tmp_path / name / fname).write_text(content)
    (tmp_path / "cooling_device0").mkdir()  # not a zone: ignored
    t = dev.read_linux_thermal(tmp_path)
    assert t is not None and t["state"] == "nominal" and len(t["zones"]) == 3
    assert dev.read_linux_thermal(tmp_path / "absent") is None


def test_probe_has_required_keys_and_is_json():
    info = dev.probe()
    for key in ("device", "dtype", "platform", "libraries", "memory", "cuda", "mps", "mps_env", "thermal"):
        assert key in info
    assert info["device"] in ("cpu", "cuda", "mps")
    assert set(info["libraries"]) == set(dev.LIBRARIES)
    assert info["libraries"]["torch"] == torch.__version__  # read from metadata, matches the import
    assert info["memory"]["total_mb"] >= info["memory"]["available_mb"] > 0
    assert set(info["mps_env"]) == {"PYTORCH_ENABLE_MPS_FALLBACK", "PYTORCH_MPS_HIGH_WATERMARK_RATIO"}
    assert info["platform"]["cpu_count"] >= 1
    json.dumps(info)
    assert dev.memory_budget_mb(info) > 0


def test_probe_reads_mps_env(monkeypatch):
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    assert dev.probe()["mps_env"]["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


def test_select_device_and_dtype():
    assert dev.select_device("cpu") == torch.device("cpu")
    assert dev.select_device(None).type == dev.auto_device_type()
    assert dev.default_dtype(torch.device("cpu")) == torch.float32
    assert dev.default_dtype("mps") == torch.float16
    with pytest.raises(ValueError, match="unsupported|unknown"):
        dev.select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dev.select_device("cuda")
    if dev.auto_device_type() != "mps":
        with pytest.raises(ValueError, match="MPS"):
            dev.select_device("mps")


def test_peak_memory_cpu_sees_a_transient_allocation():
    # 200 MB written (so it is resident), held 60 ms, then freed before the block ends: only
    # the sampling thread can see it.
    with dev.PeakMemory("cpu") as pm:
        block = np.ones(200 * 1024 * 1024 // 8)
        time.sleep(0.06)
        del block
    assert pm.delta_mb > 150
    assert pm.peak_mb == pytest.approx(pm.peak_rss_mb)
    assert pm.peak_rss_mb >= pm.start_rss_mb + 150
    d = pm.to_dict()
    assert d["device"] == "cpu" and d["delta_mb"] > 150


def test_peak_memory_cpu_idle_block_is_small():
    with dev.peak_memory_tracker("cpu") as pm:
        time.sleep(0.02)
    assert pm.delta_mb < 50
    assert pm.elapsed_s >= 0.02


@pytest.mark.parametrize(
    ("torch_version", "macos", "chip", "expected"),
    [
        ("2.13.0", "15.2", "Apple M3 Max", "bf16"),
        ("2.13.0+cpu", "14.0", "Apple M2", "bf16"),
        ("2.13.0", "15.2", "Apple M1 Pro", "fp16"),  # bf16 only emulated on the M1
        ("2.13.0", "13.6.1", "Apple M2", "fp16"),  # no MPS bf16 before Sonoma
        ("2.5.1", "15.2", "Apple M3", "fp16"),  # no bf16 autocast on MPS before torch 2.6
        ("2.13.0", "", "", "fp16"),  # not a Mac at all
    ],
)
def test_mps_half_precision_follows_chip_os_and_torch(torch_version, macos, chip, expected):
    choice, why = dev.mps_half_precision(torch_version, macos, chip)
    assert choice == expected
    assert why  # the reason is shown to the user


def test_vae_stays_fp32_only_where_fp16_overflows():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        force_upcast=True)
    assert dev.vae_needs_fp32(vae, torch.float16)
    assert not dev.vae_needs_fp32(vae, torch.bfloat16) and not dev.vae_needs_fp32(vae, torch.float32)
    vae.register_to_config(force_upcast=False)
    assert not dev.vae_needs_fp32(vae, torch.float16)
