"""Thermal awareness for long training runs: pause while the OS says the machine is throttling.

A fanless or small laptop (a 16 GB MacBook Air, say) that runs hot lowers its CPU/GPU clocks;
training on at a fraction of the speed only keeps it hot. :class:`ThermalGuard` is called by
the trainer after every optimizer step and, every `train.thermal_check_every` steps, reads the
OS thermal state (:func:`stunning.device.thermal_state`: `pmset -g therm` on macOS, the
`/sys/class/thermal` zones on Linux). While the state says the machine is throttling
(:func:`is_throttling`), it sleeps in chunks of `train.thermal_pause_s` seconds and reads the
state again, until it is no longer throttling or `train.thermal_max_pause_s` seconds of pausing
have been spent over the whole run (after that it only counts, so a machine that never cools
down still finishes). Pausing never changes the trained weights: the step sequence, the data
and the random draws are the same, only later.

The probe and the sleep function are injectable, so tests feed captured states and never
really sleep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ThermalProbe = Callable[[], Mapping[str, Any] | None]

# The overall `state` values of stunning.device's parsers that mean "the machine is slowing
# itself down because of heat": pmset's "throttled"; sysfs's "hot" (at or above a passive/hot
# trip point, where the kernel throttles) and "critical".
THROTTLING_STATES = frozenset({"throttled", "hot", "critical"})


def is_throttling(state: Mapping[str, Any] | None) -> bool:
    """True when a thermal state (as returned by :func:`stunning.device.thermal_state`) reports
    that the machine is throttling because of heat.

    The decision is the parser's overall ``state`` key:

    - macOS (``parse_pmset_therm``): ``"throttled"`` when ``CPU_Speed_Limit`` or
      ``CPU_Scheduler_Limit`` is below 100 % or a thermal/performance warning level is recorded;
    - Linux (``parse_linux_thermal``): ``"hot"`` (a zone at or above its passive/hot trip point)
      or ``"critical"``.

    ``"nominal"``, ``"unknown"`` (nothing parseable) and ``None`` (the OS reports nothing, e.g.
    in a container) are not throttling: the guard never pauses on a guess.
    """
    if not state:
        return False
    return str(state.get("state", "")).lower() in THROTTLING_STATES


def describe(state: Mapping[str, Any] | None) -> str:
    """A short label for a progress bar: ``nominal 48C``, ``throttled cpu 35%``, ``n/a``."""
    if not state:
        return "n/a"
    label = str(state.get("state", "unknown"))
    temp = state.get("max_temp_c")
    speed = state.get("cpu_speed_limit_pct")
    if isinstance(temp, int | float):
        label += f" {temp:.0f}C"
    elif isinstance(speed, int | float) and speed < 100:
        label += f" cpu {speed:.0f}%"
    return label


@dataclass(frozen=True)
class ThermalEvent:
    """One check that found the machine throttling: when, how long it paused, how it ended."""

    step: int
    state: str
    paused_s: float
    recovered: bool  # False: the state still said throttling when the pause (budget) ended


@dataclass(frozen=True)
class ThermalCheck:
    """The outcome of one check: the state read first, whether it was throttling, the pause."""

    step: int
    state: Mapping[str, Any] | None
    throttled: bool
    paused_s: float


class ThermalGuard:
    """Checks the thermal state every `check_every` steps and pauses while it is throttling.

    `probe` returns a thermal state or None (default :func:`stunning.device.thermal_state`);
    `check_every=0` disables the guard; `pause_s` is the length of one sleep; `max_pause_s`
    caps the pausing summed over the guard's lifetime (one training run). Counters: `checks`,
    `throttled_checks`, `paused_s`; `events` lists the throttled checks; `last_state` is the
    newest state read (None before the first check or where the OS reports none).
    """

    def __init__(
        self,
        probe: ThermalProbe | None = None,
        check_every: int = 50,
        pause_s: float = 30.0,
        max_pause_s: float = 600.0,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        if check_every < 0:
            raise ValueError(f"train.thermal_check_every={check_every}: use 0 (off) or a positive number of steps")
        if pause_s <= 0:
            raise ValueError(f"train.thermal_pause_s={pause_s}: use a positive number of seconds")
        if max_pause_s < 0:
            raise ValueError(f"train.thermal_max_pause_s={max_pause_s}: use 0 (never pause) or more seconds")
        if probe is None:
            from stunning.device import thermal_state

            probe = thermal_state
        self.probe = probe
        self.check_every = check_every
        self.pause_s = float(pause_s)
        self.max_pause_s = float(max_pause_s)
        self.sleep = sleep
        self.checks = 0
        self.throttled_checks = 0
        self.paused_s = 0.0
        self.events: list[ThermalEvent] = []
        self.last_state: Mapping[str, Any] | None = None
        self._budget_warned = False
        self._probe_failed = False

    @property
    def enabled(self) -> bool:
        return self.check_every > 0

    def _read(self) -> Mapping[str, Any] | None:
        # A failing probe (an unreadable sensor, a missing command) must never stop training.
        try:
            state = self.probe()
        except Exception as exc:  # noqa: BLE001 -- any probe failure reads as "no report"
            if not self._probe_failed:
                log.warning("thermal probe failed (%s); treating the state as unknown", exc)
                self._probe_failed = True
            state = None
        self.last_state = state
        return state

    def __call__(self, step: int) -> ThermalCheck | None:
        """Check at steps that are multiples of `check_every`; None at the others (or when off)."""
        if not self.enabled or step % self.check_every:
            return None
        state = first = self._read()
        self.checks += 1
        if not is_throttling(state):
            return ThermalCheck(step, first, False, 0.0)
        self.throttled_checks += 1
        paused = 0.0
        while is_throttling(state) and self.paused_s < self.max_pause_s:
            chunk = min(self.pause_s, self.max_pause_s - self.paused_s)
            if paused == 0.0:
                log.warning(
                    "step %d: the machine is throttling (%s); pausing training to let it cool down",
                    step,
                    describe(state),
                )
            self.sleep(chunk)
            self.paused_s += chunk
            paused += chunk
            state = self._read()
        recovered = not is_throttling(state)
        if paused:
            log.info("step %d: paused %.0f s for heat; now %s", step, paused, describe(state))
        if not recovered and not self._budget_warned:
            log.warning(
                "step %d: still throttling after %.0f s of pauses (train.thermal_max_pause_s=%g); training on "
                "without pausing: expect slower steps. Cool the machine or raise train.thermal_max_pause_s.",
                step,
                self.paused_s,
                self.max_pause_s,
            )
            self._budget_warned = True
        label = str(first.get("state", "unknown")) if first else "unknown"
        self.events.append(ThermalEvent(step, label, paused, recovered))
        return ThermalCheck(step, first, True, paused)

    def metrics(self) -> dict[str, float]:
        """Counters for the run's summary: checks, throttled checks, seconds paused."""
        return {
            "thermal_checks": self.checks,
            "thermal_throttled_checks": self.throttled_checks,
            "thermal_paused_s": round(self.paused_s, 3),
        }
