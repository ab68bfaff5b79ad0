"""Device and environment probe: which accelerator to use, in which dtype, and how much memory.

`probe()` gathers what a user (or a bug report) needs to know about the machine a run happens
on: platform, library versions, memory, CUDA/MPS details, MPS fallback settings and the
thermal state where the OS reports one (a throttled laptop explains a slow run).
`select_device` and `default_dtype` are the one place that picks a device and a dtype, and
:class:`PeakMemory` measures the peak memory of a block of code on any device.

The thermal parsers are pure functions over command output / sysfs text so they are tested
on captured samples from real machines.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)

MB = 1024 * 1024

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "mlflow", "prefect", "dvc")
MPS_ENV_VARS = ("PYTORCH_ENABLE_MPS_FALLBACK", "PYTORCH_MPS_HIGH_WATERMARK_RATIO")

# Fallback thresholds when a Linux thermal zone publishes no trip points (degrees Celsius).
LINUX_HOT_C = 85.0
LINUX_CRITICAL_C = 100.0


# --------------------------------------------------------------------------- device choice


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def auto_device_type() -> str:
    """'mps', 'cuda' or 'cpu': the first available in that order (the project targets laptops)."""
    if _mps_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def select_device(prefer: str | None = None) -> torch.device:
    """The device to run on: `prefer` ('cpu', 'cuda', 'cuda:1', 'mps') if available, else auto.

    `None` or 'auto' picks automatically. Asking for an unavailable accelerator is an error
    rather than a silent fallback to CPU, which would make a run 100x slower unnoticed.
    """
    if prefer is None or prefer.strip().lower() in ("", "auto"):
        return torch.device(auto_device_type())
    try:
        dev = torch.device(prefer.strip().lower())
    except RuntimeError as exc:
        raise ValueError(f"unknown device {prefer!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} requested but CUDA is not available on this machine; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {prefer!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {prefer!r} requested but MPS (Apple Silicon GPU) is not available; use auto or cpu"
            )
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {prefer!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype for frozen weights on `device`.

    CPU: float32 (half-precision matmuls on CPU are slow or unsupported for many kernels).
    CUDA: bfloat16 where the GPU supports it (Ampere and newer; no loss scaling needed),
    else float16.
    MPS: what :func:`mps_half_precision` picks for this Mac (bfloat16 on M2 and newer with
    macOS 14+ and torch 2.6+, else float16). Trainable LoRA parameters stay float32
    regardless, so training stays stable.
    """
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "mps":
        return torch.bfloat16 if mps_half_precision()[0] == "bf16" else torch.float16
    return torch.float32


# torch added bfloat16 autocast on MPS in 2.6 (MPS bf16 tensors need macOS 14, Sonoma).
MPS_BF16_MIN_TORCH = (2, 6)
MPS_BF16_MIN_MACOS = (14, 0)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = re.findall(r"\d+", (text or "").split("+")[0])
    return tuple(int(p) for p in parts[:3])


def mps_half_precision(
    torch_version: str | None = None, macos_version: str | None = None, chip: str | None = None
) -> tuple[str, str]:
    """("bf16" | "fp16", why) for training and sampling on an Apple-silicon GPU.

    The choice the Mac trainers make: bfloat16 (what SimpleTuner, ai-toolkit and mflux train
    FLUX/SD3 in; the range of float32, so no loss scaling and no fp16 overflow in large
    transformers) where it is real, i.e. macOS 14+ (MPS has no bf16 before Sonoma), torch
    2.6+ (bf16 autocast on MPS) and an M2 or newer chip (the M1 has no bf16 arithmetic;
    Metal emulates it through float32, slower than fp16). Otherwise float16, the path of
    diffusers' MPS guide and Apple's Core ML Stable Diffusion, with a gradient scaler. The
    VAE stays float32 where fp16 overflows (see :func:`vae_needs_fp32`). Arguments default
    to this machine's values; tests pass captured ones.
    """
    torch_version = torch.__version__ if torch_version is None else torch_version
    if macos_version is None:
        macos_version = platform.mac_ver()[0]
    if chip is None:
        chip = _mac_chip()
    if _version_tuple(torch_version) < MPS_BF16_MIN_TORCH:
        return "fp16", f"torch {torch_version} has no bfloat16 autocast on MPS (needs 2.6+)"
    if not macos_version or _version_tuple(macos_version) < MPS_BF16_MIN_MACOS:
        return "fp16", f"macOS {macos_version or 'unknown'} has no bfloat16 on MPS (needs 14+)"
    if re.search(r"\bM1\b", chip or ""):
        return "fp16", f"{chip} emulates bfloat16 in float32 (M2 or newer computes it natively)"
    return "bf16", f"{chip or 'Apple silicon'}, macOS {macos_version}, torch {torch_version}: native bfloat16"


def _mac_chip() -> str:
    """The Mac's chip name (e.g. 'Apple M2 Pro'), or '' where sysctl does not tell."""
    if platform.system() != "Darwin":
        return ""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def vae_needs_fp32(vae: torch.nn.Module, dtype: torch.dtype) -> bool:
    """True when `vae` must stay float32 under `dtype`: float16 with a VAE whose config sets
    `force_upcast` (diffusers' flag for VAEs that overflow in fp16, e.g. SDXL's)."""
    config = getattr(vae, "config", None)
    return dtype == torch.float16 and bool(getattr(config, "force_upcast", False))


# --------------------------------------------------------------------------- thermal parsers


def parse_pmset_therm(text: str) -> dict[str, Any]:
    """Parse `pmset -g therm` (macOS) into a thermal state.

    `CPU_Speed_Limit` is the percentage of nominal CPU speed currently allowed (100 = not
    throttled); the warning levels are only printed once the OS has recorded one. Apple
    Silicon Macs often print only the three "Note: No ... recorded" lines: nominal.
    """

    def _int(pattern: str) -> int | None:
        m = re.search(pattern, text, flags=re.IGNORECASE)
        return int(m.group(1)) if m else None

    speed = _int(r"CPU_Speed_Limit\s*=\s*(\d+)")
    scheduler = _int(r"CPU_Scheduler_Limit\s*=\s*(\d+)")
    cpus = _int(r"CPU_Available_CPUs\s*=\s*(\d+)")
    thermal_level = _int(r"Thermal\s+Warning\s+Level\s*(?:=|is|set to)?\s*(\d+)")
    perf_level = _int(r"Performance\s+Warning\s+Level\s*(?:=|is|set to)?\s*(\d+)")

    throttled = (speed is not None and speed < 100) or (scheduler is not None and scheduler < 100)
    warned = bool(thermal_level) or bool(perf_level)
    if throttled or warned:
        state = "throttled"
    elif speed is None and thermal_level is None and perf_level is None and "no thermal warning" not in text.lower():
        state = "unknown"
    else:
        state = "nominal"
    return {
        "source": "pmset",
        "state": state,
        "cpu_speed_limit_pct": speed,
        "cpu_scheduler_limit_pct": scheduler,
        "cpu_available_cpus": cpus,
        "thermal_warning_level": thermal_level,
        "performance_warning_level": perf_level,
    }


def _parse_millideg(raw: str | None) -> float | None:
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    # sysfs reports millidegrees Celsius; a few drivers report whole degrees.
    return value / 1000.0 if abs(value) >= 1000 else float(value)


def parse_linux_thermal(zones: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """Parse Linux thermal zones read from `/sys/class/thermal/thermal_zone*`.

    `zones` maps a zone name (`thermal_zone0`) to its files' contents: `type`, `temp`
    (millidegrees Celsius) and optionally `trip_point_N_type` / `trip_point_N_temp`. A zone
    at or above a `passive`/`hot` trip point is "hot" (the kernel throttles there); at or
    above a `critical` one, "critical". Without trip points fixed thresholds are used.
    """
    rank = {"nominal": 0, "hot": 1, "critical": 2}
    parsed = []
    overall = "nominal"
    for name in sorted(zones, key=lambda z: (len(z), z)):
        files = zones[name]
        temp = _parse_millideg(files.get("temp"))
        if temp is None:
            continue  # zones whose sensor is off read as errors/empty; they say nothing
        hot_c, crit_c = None, None
        for key, value in files.items():
            m = re.fullmatch(r"trip_point_(\d+)_type", key)
            if not m:
                continue
            trip_temp = _parse_millideg(files.get(f"trip_point_{m.group(1)}_temp"))
            kind = value.strip()
            if trip_temp is None or trip_temp <= 0:
                continue
            if kind in ("passive", "hot"):
                hot_c = trip_temp if hot_c is None else min(hot_c, trip_temp)
            elif kind == "critical":
                crit_c = trip_temp if crit_c is None else min(crit_c, trip_temp)
        crit_limit = crit_c if crit_c is not None else LINUX_CRITICAL_C
        hot_limit = hot_c if hot_c is not None else (min(LINUX_HOT_C, crit_limit - 5.0))
        state = "critical" if temp >= crit_limit else "hot" if temp >= hot_limit else "nominal"
        if rank[state] > rank[overall]:
            overall = state
        parsed.append(
            {
                "zone": name,
                "type": files.get("type", "").strip() or None,
                "temp_c": temp,
                "hot_c": hot_limit,
                "critical_c": crit_limit,
                "state": state,
            }
        )
    if not parsed:
        return {"source": "sysfs", "state": "unknown", "max_temp_c": None, "zones": []}
    return {
        "source": "sysfs",
        "state": overall,
        "max_temp_c": max(z["temp_c"] for z in parsed),
        "zones": parsed,
    }


def read_linux_thermal(root: Path = Path("/sys/class/thermal")) -> dict[str, Any] | None:
    """Read the thermal zones under `root` and parse them; None when there are none."""
    root = Path(root)
    if not root.is_dir():
        return None
    zones: dict[str, dict[str, str]] = {}
    for zone in root.glob("thermal_zone*"):
        files: dict[str, str] = {}
        for f in zone.iterdir():
            if f.name in ("type", "temp") or re.fullmatch(r"trip_point_\d+_(type|temp)", f.name):
                try:
                    files[f.name] = f.read_text()
                except OSError:
                    # Some drivers return EIO/ENODATA for a sensor that is switched off.
                    continue
        zones[zone.name] = files
    if not zones:
        return None
    return parse_linux_thermal(zones)


def thermal_state() -> dict[str, Any] | None:
    """The OS-reported thermal state, or None where the OS reports none (e.g. containers)."""
    system = platform.system()
    if system == "Darwin":
        try:
            out = subprocess.run(["pmset", "-g", "therm"], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("pmset -g therm failed: %s", exc)
            return None
        return parse_pmset_therm(out.stdout + out.stderr)
    if system == "Linux":
        return read_linux_thermal()
    return None


# --------------------------------------------------------------------------- probe


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions read from package metadata (nothing is imported); None if absent."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cuda_info() -> dict[str, Any]:
    info: dict[str, Any] = {"available": torch.cuda.is_available(), "version": torch.version.cuda}
    if info["available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_count=torch.cuda.device_count(),
            device_name=props.name,
            total_memory_mb=round(props.total_memory / MB, 1),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
        )
    return info


def _mps_info() -> dict[str, Any]:
    mps_backend = getattr(torch.backends, "mps", None)
    info: dict[str, Any] = {
        "available": _mps_available(),
        "built": bool(mps_backend is not None and mps_backend.is_built()),
        "recommended_max_memory_mb": None,
    }
    if info["available"] and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        info["recommended_max_memory_mb"] = round(torch.mps.recommended_max_memory() / MB, 1)
    return info


def probe() -> dict[str, Any]:
    """Everything about this machine that decides how a run goes; JSON-serialisable."""
    vm = psutil.virtual_memory()
    device = auto_device_type()
    return {
        "device": device,
        "dtype": str(default_dtype(torch.device(device))).removeprefix("torch."),
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "cpu_count_physical": psutil.cpu_count(logical=False),
        },
        "libraries": library_versions(),
        "memory": {
            "total_mb": round(vm.total / MB, 1),
            "available_mb": round(vm.available / MB, 1),
        },
        "cuda": _cuda_info(),
        "mps": _mps_info(),
        "mps_env": {name: os.environ.get(name) for name in MPS_ENV_VARS},
        "thermal": thermal_state(),
    }


def memory_budget_mb(info: Mapping[str, Any]) -> float:
    """Memory the chosen device can use, from a probe: GPU memory on CUDA, the recommended
    working set on MPS (unified memory shared with the OS), else total system RAM."""
    device = info.get("device")
    if device == "cuda" and info.get("cuda", {}).get("total_memory_mb"):
        return float(info["cuda"]["total_memory_mb"])
    if device == "mps" and info.get("mps", {}).get("recommended_max_memory_mb"):
        return float(info["mps"]["recommended_max_memory_mb"])
    return float(info["memory"]["total_mb"])


# --------------------------------------------------------------------------- peak memory


class PeakMemory:
    """Measure the peak memory of a block: ``with PeakMemory(device) as pm: ...``.

    After the block, `pm.peak_mb` is the peak of the device's own measure and `pm.delta_mb`
    that peak minus its value at the start:

    - CUDA: `torch.cuda.max_memory_allocated` (exact, reset at entry);
    - MPS: `torch.mps.driver_allocated_memory`, sampled;
    - CPU: the process resident set size (RSS) peak.

    The process RSS peak is kept on every device (`pm.peak_rss_mb`, `pm.start_rss_mb`). On
    Linux it is the kernel's own high-water mark (`VmHWM`, reset at entry through
    /proc/self/clear_refs): exact and free. Elsewhere, and for MPS, a daemon thread samples
    every `interval_s` (5 ms), so a spike shorter than that can be missed; the start and end
    of the block are always sampled. (A 5-ms Python sampler costs a CPU-bound training loop
    on 2 cores about 13 % of its speed, which is why it only runs where it must.)
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.005) -> None:
        if device is None:
            device = auto_device_type()
        self.device = torch.device(device) if isinstance(device, str) else device
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False
        self._start_rss = 0
        self._peak_rss = 0
        self._start_dev = 0
        self._peak_dev = 0
        self.peak_mb = 0.0
        self.delta_mb = 0.0
        self.peak_rss_mb = 0.0
        self.start_rss_mb = 0.0
        self.elapsed_s = 0.0
        self._t0 = 0.0

    def _mps_bytes(self) -> int:
        return int(torch.mps.driver_allocated_memory())

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self._peak_rss:
            self._peak_rss = rss
        if self.device.type == "mps":
            used = self._mps_bytes()
            if used > self._peak_dev:
                self._peak_dev = used

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @staticmethod
    def _reset_hwm() -> bool:
        """Reset the kernel's RSS high-water mark (Linux); False where that is not possible."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _read_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_dev = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "mps":
            self._start_dev = self._mps_bytes()
        self._start_rss = self._peak_rss = self._proc.memory_info().rss
        self._peak_dev = self._start_dev
        self._hwm = self._reset_hwm()
        self._stop.clear()
        self._thread = None
        if self.device.type == "mps" or not self._hwm:
            self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak_dev = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._hwm:
            self._peak_rss = max(self._peak_rss, self._read_hwm() or 0)
        self.elapsed_s = time.perf_counter() - self._t0
        self.peak_rss_mb = self._peak_rss / MB
        self.start_rss_mb = self._start_rss / MB
        if self.device.type in ("cuda", "mps"):
            self.peak_mb = self._peak_dev / MB
            self.delta_mb = max(0.0, (self._peak_dev - self._start_dev) / MB)
        else:
            self.peak_mb = self.peak_rss_mb
            self.delta_mb = max(0.0, (self._peak_rss - self._start_rss) / MB)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "peak_mb": round(self.peak_mb, 2),
            "delta_mb": round(self.delta_mb, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 2),
            "start_rss_mb": round(self.start_rss_mb, 2),
            "elapsed_s": round(self.elapsed_s, 4),
        }


def peak_memory_tracker(device: torch.device | str | None = None, interval_s: float = 0.005) -> PeakMemory:
    """Alias of :class:`PeakMemory` for call sites that read better as a function."""
    return PeakMemory(device, interval_s=interval_s)
