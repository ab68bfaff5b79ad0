"""Thermal guard: pauses while captured OS states say throttling, within its budget; the trainer
logs and reports its counters. Probes are fed parsed captured outputs; nothing really sleeps
except a few hundredths of a second in the training test."""

from __future__ import annotations

import itertools

import pytest

from stunning.device import parse_linux_thermal, parse_pmset_therm
from stunning.training.thermal import ThermalGuard, describe, is_throttling
from tests.factories import PMSET_APPLE_SILICON, PMSET_NOMINAL, PMSET_THROTTLED

NOMINAL = parse_pmset_therm(PMSET_NOMINAL)
THROTTLED = parse_pmset_therm(PMSET_THROTTLED)


def linux_state(pkg_millideg: int) -> dict:
    """A laptop's sysfs zones (package sensor with a passive trip point at 90 C)."""
    return parse_linux_thermal({
        "thermal_zone0": {"type": "acpitz\n", "temp": "27800\n", "trip_point_0_type": "critical\n",
                          "trip_point_0_temp": "119000\n"},
        "thermal_zone2": {"type": "x86_pkg_temp\n", "temp": f"{pkg_millideg}\n", "trip_point_0_type": "passive\n",
                          "trip_point_0_temp": "90000\n", "trip_point_1_type": "critical\n",
                          "trip_point_1_temp": "100000\n"},
    })


class Probe:
    """Returns the given states in turn (the last one forever); counts its calls."""

    def __init__(self, *states):
        self.states = list(states)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.states[min(self.calls, len(self.states)) - 1]


class FakeSleep:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_is_throttling_on_captured_states():
    assert is_throttling(THROTTLED)
    assert not is_throttling(NOMINAL)
    assert not is_throttling(parse_pmset_therm(PMSET_APPLE_SILICON))
    assert not is_throttling(parse_pmset_therm("pmset: command failed"))  # "unknown" is no reason to pause
    assert not is_throttling(None)
    assert not is_throttling(linux_state(48000))
    assert is_throttling(linux_state(93000))  # past the passive trip point: the kernel throttles
    assert is_throttling(linux_state(101000))  # critical
    assert describe(THROTTLED) == "throttled cpu 35%"
    assert describe(linux_state(48000)) == "nominal 48C"
    assert describe(None) == "n/a"


def test_throttled_machine_pauses_until_nominal_again():
    probe, sleep = Probe(THROTTLED, THROTTLED, THROTTLED, NOMINAL), FakeSleep()
    guard = ThermalGuard(probe, check_every=5, pause_s=30, max_pause_s=600, sleep=sleep)
    assert [guard(step) for step in range(1, 5)] == [None] * 4 and probe.calls == 0  # only every 5th step
    check = guard(5)
    assert check is not None and check.throttled and check.state is THROTTLED
    assert sleep.calls == [30, 30, 30]  # paused three times, read nominal after the third
    assert check.paused_s == 90 and guard.paused_s == 90
    assert guard.last_state is NOMINAL
    [event] = guard.events
    assert (event.step, event.state, event.paused_s, event.recovered) == (5, "throttled", 90, True)

    check = guard(10)  # nominal now: a check, no pause
    assert not check.throttled and check.paused_s == 0 and len(sleep.calls) == 3
    assert guard.metrics() == {"thermal_checks": 2, "thermal_throttled_checks": 1, "thermal_paused_s": 90}


def test_pausing_stops_at_the_run_budget():
    sleep = FakeSleep()
    guard = ThermalGuard(Probe(THROTTLED), check_every=1, pause_s=30, max_pause_s=70, sleep=sleep)
    first = guard(1)
    assert sleep.calls == [30, 30, 10]  # the last chunk is cut to the budget
    assert first.paused_s == 70 and not guard.events[0].recovered
    # The budget is for the whole run: later throttled checks are counted, not paused.
    for step in (2, 3):
        check = guard(step)
        assert check.throttled and check.paused_s == 0
    assert sleep.calls == [30, 30, 10]
    assert guard.paused_s == 70 and guard.throttled_checks == 3 and guard.checks == 3


def test_no_thermal_report_never_pauses():
    sleep = FakeSleep()
    probe = Probe(None)
    guard = ThermalGuard(probe, check_every=2, pause_s=30, max_pause_s=600, sleep=sleep)
    for step in range(1, 11):
        guard(step)
    assert probe.calls == 5 and guard.checks == 5
    assert sleep.calls == [] and guard.throttled_checks == 0 and guard.paused_s == 0
    assert guard.last_state is None


def test_check_every_zero_disables_the_guard():
    probe, sleep = Probe(THROTTLED), FakeSleep()
    guard = ThermalGuard(probe, check_every=0, sleep=sleep)
    assert not guard.enabled
    assert all(guard(step) is None for step in range(1, 200))
    assert probe.calls == 0 and sleep.calls == [] and guard.metrics()["thermal_checks"] == 0


def test_a_failing_probe_reads_as_no_report():
    def broken():
        raise OSError("sensor went away")

    sleep = FakeSleep()
    guard = ThermalGuard(broken, check_every=1, sleep=sleep)
    assert not guard(1).throttled and sleep.calls == [] and guard.checks == 1


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="train.thermal_check_every"):
        ThermalGuard(Probe(None), check_every=-1)
    with pytest.raises(ValueError, match="train.thermal_pause_s"):
        ThermalGuard(Probe(None), pause_s=0)
    with pytest.raises(ValueError, match="train.thermal_max_pause_s"):
        ThermalGuard(Probe(None), max_pause_s=-1)


# --------------------------------------------------------------------------- in the trainer


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_logs_and_reports_thermal_counters(tmp_path, tiny_base):
    from stunning.training.trainer import train_style
    from tests.factories import RecordingTracker, make_curated, tiny_train_config

    curated = make_curated(tmp_path / "curated")
    # Throttled at the check of step 2 (paused, then nominal), throttled for good from step 4.
    states = itertools.chain([THROTTLED, NOMINAL], itertools.repeat(THROTTLED))
    cfg = tiny_train_config(steps=4, batch_size=2, learning_rate=5e-3, thermal_check_every=2, thermal_pause_s=0.01,
                      thermal_max_pause_s=0.02)
    tracker = RecordingTracker()
    summary = train_style(tiny_base, "sd3", curated, "noir", cfg, tmp_path / "out", tracker, None, "cpu",
                          sample_seeds=(), thermal_probe=lambda: next(states))
    assert summary["thermal_checks"] == 2 and summary["thermal_throttled_checks"] == 2
    assert summary["thermal_paused_s"] == pytest.approx(0.02)  # 0.01 at step 2, the last 0.01 at step 4
    per_step = {step: m for m, step in tracker.metrics if step is not None and "loss" in m}
    assert per_step[2]["thermal_throttled"] == 1.0 and per_step[2]["thermal_paused_s"] == pytest.approx(0.01)
    assert per_step[4]["thermal_throttled"] == 1.0 and per_step[4]["thermal_paused_s"] == pytest.approx(0.02)
    assert "thermal_throttled" not in per_step[1] and "thermal_throttled" not in per_step[3]
    final = {k: v for m, step in tracker.metrics if step is None for k, v in m.items()}
    assert final["thermal_paused_s"] == pytest.approx(0.02) and final["thermal_throttled_checks"] == 2

    # Pausing changes when steps run, never what they compute.
    unguarded = train_style(tiny_base, "sd3", curated, "noir", cfg.model_copy(update={"thermal_check_every": 0}),
                            tmp_path / "plain", None, None, "cpu", sample_seeds=())
    assert unguarded["loss_history"] == summary["loss_history"]
    assert unguarded["thermal_checks"] == 0 and unguarded["thermal_paused_s"] == 0
