"""Alert rules: declarative thresholds with duration and hysteresis over observed metrics.

Pure core. Owners feed values with `AlertRules.observe(metric, value)`; the
rules for that metric are evaluated against the injected clock and every
firing/resolved transition is handed to `on_change` synchronously, exactly once.

Per rule and key (the call id for call-scoped rules) the state is:

- ok -> pending when the value crosses `threshold` (`value op threshold`);
  pending -> firing once the condition has held for `for_s` (every observation
  in between must be bad too; a good one resets the timer);
- firing -> clearing when the value is back past `clear_threshold`
  (not `value op clear_threshold`); clearing -> resolved after `clear_for_s`.
  A value between the two thresholds keeps firing and resets the clear timer,
  so a value oscillating around `threshold` cannot flap.

A None value (no data) holds the state and its timers. Durations are judged on
observations (and on `tick()`, which re-applies each key's last value), so an
owner that samples every 5 s sees a 10 s rule fire on the sample at or after 10 s.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from edgeagent.clock import Clock
    from edgeagent.health.system import SystemSample

logger = logging.getLogger(__name__)

Op = Literal[">", "<", ">=", "<="]
Severity = Literal["info", "warning", "critical"]
Scope = Literal["device", "call"]
AlertState = Literal["firing", "resolved"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""Rule names are a topic level of `alerts/<name>`: no '/', '+' or '#'."""
RUNBOOK_BASE = "https://runbooks.example/edgeagent/"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}
_EPS = 1e-9  # float slack when comparing elapsed time with a duration


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One declarative rule; `message` is a str.format template (see `render`)."""

    name: str
    metric: str
    op: Op
    threshold: float
    for_s: float = 0.0
    clear_threshold: float | None = None
    """Hysteresis: resolve only once the value is back past this (default: threshold)."""
    clear_for_s: float = 0.0
    severity: Severity = "warning"
    runbook: str | None = None
    message: str = "{metric} {value:g} {op} {threshold:g}"
    resolved_message: str = "{name} resolved ({metric} {value:g})"
    scope: Scope = "device"

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(NAME_PATTERN, self.name):
            problems.append(f"name {self.name!r} must match {NAME_PATTERN}")
        if not self.metric:
            problems.append("metric must not be empty")
        if self.op not in _OPS:
            problems.append(f"op {self.op!r} must be one of {', '.join(_OPS)}")
        if self.severity not in get_args(Severity):
            problems.append(f"severity {self.severity!r} must be info, warning or critical")
        if self.scope not in get_args(Scope):
            problems.append(f"scope {self.scope!r} must be device or call")
        for key in ("threshold", "for_s", "clear_for_s"):
            if not math.isfinite(getattr(self, key)):
                problems.append(f"{key} must be a finite number")
        if self.for_s < 0 or self.clear_for_s < 0:
            problems.append("for_s and clear_for_s must be >= 0")
        clear = self.clear_at
        if self.op in _OPS and not math.isfinite(clear):
            problems.append("clear_threshold must be a finite number")
        elif self.op in (">", ">=") and clear > self.threshold:
            problems.append(
                f"clear_threshold {clear:g} must be <= threshold {self.threshold:g}"
                f" for op {self.op}"
            )
        elif self.op in ("<", "<=") and clear < self.threshold:
            problems.append(
                f"clear_threshold {clear:g} must be >= threshold {self.threshold:g}"
                f" for op {self.op}"
            )
        if not problems:
            for key in ("message", "resolved_message"):
                try:
                    getattr(self, key).format(**self._template_vars(1.0))
                except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
                    problems.append(f"{key} template {getattr(self, key)!r}: {exc!r}")
        if problems:
            raise ValueError(f"alert rule {self.name!r}: " + "; ".join(problems))

    @property
    def clear_at(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    def is_bad(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def is_clear(self, value: float) -> bool:
        return not _OPS[self.op](value, self.clear_at)

    def render(self, value: float) -> str:
        return self._format(self.message, value)

    def render_resolved(self, value: float) -> str:
        return self._format(self.resolved_message, value)

    def _template_vars(self, value: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "value": value,
            "op": self.op,
            "threshold": self.threshold,
            "clear_threshold": self.clear_at,
            "for_s": self.for_s,
            "severity": self.severity,
        }

    def _format(self, template: str, value: float) -> str:
        try:
            return template.format(**self._template_vars(value))
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            # Validated at construction; a value of an odd type must not lose the alert.
            return f"{self.name}: {self.metric} {value!r} {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class AlertChange:
    """A transition of one alert; `since` is the wall time the new condition began."""

    name: str
    state: AlertState
    severity: Severity
    value: float | None
    threshold: float
    message: str
    runbook: str | None
    since: float
    call_id: str | None = None


@dataclass(slots=True)
class _Track:
    firing: bool = False
    bad_since: float | None = None
    bad_since_wall: float = 0.0
    clear_since: float | None = None
    clear_since_wall: float = 0.0
    last_value: float | None = None
    fired: AlertChange | None = None


_Key = tuple[str, str | None]


class AlertRules:
    """Evaluates rules over observed metrics and reports transitions to `on_change`."""

    def __init__(
        self,
        rules: Iterable[AlertRule],
        clock: Clock,
        on_change: Callable[[AlertChange], None],
    ) -> None:
        self._rules: dict[str, AlertRule] = {}
        self._by_metric: dict[str, list[AlertRule]] = {}
        for rule in rules:
            if rule.name in self._rules:
                raise ValueError(f"duplicate alert rule {rule.name!r}")
            self._rules[rule.name] = rule
            self._by_metric.setdefault(rule.metric, []).append(rule)
        self._clock = clock
        self._on_change = on_change
        self._tracks: dict[_Key, _Track] = {}

    @property
    def rules(self) -> tuple[AlertRule, ...]:
        return tuple(self._rules.values())

    @property
    def metrics(self) -> frozenset[str]:
        """The metric names some rule watches (owners may skip the others)."""
        return frozenset(self._by_metric)

    def observe(self, metric: str, value: float | None, *, call_id: str | None = None) -> None:
        """Evaluate every rule on `metric` with this value; None holds the state."""
        rules = self._by_metric.get(metric)
        if not rules or value is None:
            return
        value = float(value)
        if math.isnan(value):
            return
        now, wall = self._clock.monotonic(), self._clock.time()
        for rule in rules:
            key = (rule.name, call_id if rule.scope == "call" else None)
            self._step(rule, key, value, now, wall)

    def observe_many(
        self, values: Mapping[str, float | None], *, call_id: str | None = None
    ) -> None:
        for metric, value in values.items():
            self.observe(metric, value, call_id=call_id)

    def tick(self) -> None:
        """Re-evaluate every pending, firing or clearing key with its last value, at now."""
        now, wall = self._clock.monotonic(), self._clock.time()
        for key, track in list(self._tracks.items()):
            if track.last_value is not None:
                self._step(self._rules[key[0]], key, track.last_value, now, wall)

    def firing(self) -> list[AlertChange]:
        """The alerts firing now, in the order they fired, with their latest value."""
        out = [
            replace(t.fired, value=t.last_value)
            for t in self._tracks.values()
            if t.firing and t.fired is not None
        ]
        return sorted(out, key=lambda c: c.since)

    def is_firing(self, name: str, call_id: str | None = None) -> bool:
        track = self._tracks.get((name, call_id))
        return track is not None and track.firing

    def reset_scope(self, scope: Scope, call_id: str | None = None) -> None:
        """Forget every key of `scope` (one call's, or all); firing ones are resolved."""
        wall = self._clock.time()
        for key, track in list(self._tracks.items()):
            rule = self._rules[key[0]]
            if rule.scope != scope or (call_id is not None and key[1] != call_id):
                continue
            del self._tracks[key]
            if track.firing:
                reason = "call ended" if scope == "call" else "reset"
                self._emit(
                    AlertChange(
                        name=rule.name,
                        state="resolved",
                        severity=rule.severity,
                        value=None,
                        threshold=rule.threshold,
                        message=f"{rule.name} resolved: {reason}",
                        runbook=rule.runbook,
                        since=wall,
                        call_id=key[1],
                    )
                )

    def _step(self, rule: AlertRule, key: _Key, value: float, now: float, wall: float) -> None:
        track = self._tracks.get(key)
        if track is None:
            if not rule.is_bad(value):
                return
            track = self._tracks[key] = _Track()
        track.last_value = value
        if not track.firing:
            if not rule.is_bad(value):
                del self._tracks[key]  # a pending condition that did not hold
                return
            if track.bad_since is None:
                track.bad_since, track.bad_since_wall = now, wall
            if now - track.bad_since + _EPS >= rule.for_s:
                track.firing = True
                track.clear_since = None
                track.fired = AlertChange(
                    name=rule.name,
                    state="firing",
                    severity=rule.severity,
                    value=value,
                    threshold=rule.threshold,
                    message=rule.render(value),
                    runbook=rule.runbook,
                    since=track.bad_since_wall,
                    call_id=key[1],
                )
                self._emit(track.fired)
            return
        if not rule.is_clear(value):
            track.clear_since = None
            return
        if track.clear_since is None:
            track.clear_since, track.clear_since_wall = now, wall
        if now - track.clear_since + _EPS >= rule.clear_for_s:
            del self._tracks[key]
            self._emit(
                AlertChange(
                    name=rule.name,
                    state="resolved",
                    severity=rule.severity,
                    value=value,
                    threshold=rule.threshold,
                    message=rule.render_resolved(value),
                    runbook=rule.runbook,
                    since=track.clear_since_wall,
                    call_id=key[1],
                )
            )

    def _emit(self, change: AlertChange) -> None:
        logger.info(
            "alert %s: %s (%s) %s", change.name, change.state, change.severity, change.message
        )
        self._on_change(change)


# -- metric helpers --------------------------------------------------------------


class FailureRateWindow:
    """Call results over a rolling window -> the `call_failure_rate` metric.

    `rate()` is None while the window holds fewer than `min_calls` results, so a
    single failed call on a quiet device neither fires nor resolves the alert.
    """

    def __init__(self, window_s: float, min_calls: int, clock: Clock) -> None:
        if window_s <= 0 or min_calls < 1:
            raise ValueError("window_s must be > 0 and min_calls >= 1")
        self._window_s = window_s
        self._min_calls = min_calls
        self._clock = clock
        self._results: deque[tuple[float, bool]] = deque()

    def record(self, failed: bool) -> None:
        self._results.append((self._clock.monotonic(), failed))

    def record_result(self, result: str) -> None:
        """Count a call summary's `result`: completed and failed count; rejected/missed do not."""
        if result == "completed":
            self.record(False)
        elif result == "failed":
            self.record(True)

    def counts(self) -> tuple[int, int]:
        """(calls, failed) inside the window."""
        horizon = self._clock.monotonic() - self._window_s
        while self._results and self._results[0][0] <= horizon:
            self._results.popleft()
        return len(self._results), sum(1 for _, failed in self._results if failed)

    def rate(self) -> float | None:
        calls, failed = self.counts()
        return failed / calls if calls >= self._min_calls else None


class CounterIncrease:
    """A monotonic counter -> its increase since the previous update (None the first time)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def update(self, total: float | None) -> float | None:
        if total is None:
            return None
        last, self._last = self._last, float(total)
        if last is None:
            return None
        return float(total) - last if total >= last else float(total)  # reset: count anew


def flag(active: bool | None) -> float | None:
    """A boolean condition as a metric value (1/0), None when unknown."""
    return None if active is None else (1.0 if active else 0.0)


def system_metrics(sample: SystemSample) -> dict[str, float | None]:
    """The device metrics the default rules watch, from one system sample."""
    now = sample.throttled.now if sample.throttled is not None else None
    return {
        "temp_c": sample.temp_c,
        "mem_available_mb": sample.mem_available_mb,
        "disk_free_mb": sample.disk_free_mb,
        "thermal_throttled": flag(None if now is None else "throttled" in now),
        "soft_temp_limit": flag(None if now is None else "soft_temp_limit" in now),
        "under_voltage": flag(None if now is None else "under_voltage" in now),
        "modem_signal_pct": next(
            (i.modem.signal_pct for i in sample.net.values() if i.modem and i.modem.in_use),
            None,
        ),
    }


# -- built-in rules --------------------------------------------------------------


def _rule(name: str, metric: str, op: Op, threshold: float, **kw: Any) -> AlertRule:
    return AlertRule(name, metric, op, threshold, runbook=RUNBOOK_BASE + name, **kw)


def _boolean(name: str, message: str, **kw: Any) -> AlertRule:
    return _rule(name, name, ">=", 1.0, message=message, resolved_message=f"{name} resolved", **kw)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    _rule("call_failure_rate", "call_failure_rate", ">", 0.10, clear_threshold=0.05,
          severity="critical", message="call failure rate {value:.0%} above {threshold:.0%}",
          resolved_message="call failure rate back to {value:.0%}"),
    _rule("mos_low", "mos", "<", 3.0, for_s=10, clear_threshold=3.2, clear_for_s=10,
          message="MOS {value:.2f} below {threshold:g}", resolved_message="MOS back to {value:.2f}",
          scope="call"),
    _rule("loss_high", "loss_pct", ">", 3.0, for_s=10, clear_threshold=2.0, clear_for_s=10,
          message="packet loss {value:.1f}% above {threshold:g}%",
          resolved_message="packet loss back to {value:.1f}%", scope="call"),
    _rule("loss_high_critical", "loss_pct", ">", 10.0, for_s=10, clear_threshold=8.0,
          clear_for_s=10, severity="critical",
          message="packet loss {value:.1f}% above {threshold:g}%",
          resolved_message="packet loss back to {value:.1f}%", scope="call"),
    _rule("jitter_high", "jitter_ms", ">", 30.0, for_s=10, clear_threshold=25.0, clear_for_s=10,
          message="jitter {value:.0f} ms above {threshold:g} ms",
          resolved_message="jitter back to {value:.0f} ms", scope="call"),
    _rule("rtt_high", "rtt_ms", ">", 400.0, for_s=10, clear_threshold=350.0, clear_for_s=10,
          message="round-trip time {value:.0f} ms above {threshold:g} ms",
          resolved_message="round-trip time back to {value:.0f} ms", scope="call"),
    # The DSP checks debounce these themselves (no_audio after 4 s of silence,
    # echo over confirmed GCC runs...), so the rules add no delay of their own.
    _boolean("no_audio", "no audio on the call: silent or dead input", severity="critical",
             scope="call"),
    _boolean("echo", "echo of the far end heard in the capture", scope="call"),
    _boolean("clipping", "capture is clipping", scope="call"),
    _boolean("high_noise", "high background noise in the capture", scope="call"),
    _boolean("thermal_throttled", "CPU is being throttled now", clear_for_s=60),
    _boolean("soft_temp_limit", "soft temperature limit is active now", clear_for_s=60),
    _boolean("under_voltage", "supply under-voltage now", clear_for_s=60),
    _rule("temp_high", "temp_c", ">", 80.0, for_s=30, clear_threshold=75.0, clear_for_s=60,
          message="SoC temperature {value:.1f} C above {threshold:g} C",
          resolved_message="SoC temperature back to {value:.1f} C"),
    _rule("memory_low", "mem_available_mb", "<", 50.0, for_s=30, clear_threshold=64.0,
          clear_for_s=30, severity="critical",
          message="available memory {value:.0f} MB below {threshold:g} MB",
          resolved_message="available memory back to {value:.0f} MB"),
    _rule("disk_low", "disk_free_mb", "<", 100.0, for_s=60, clear_threshold=128.0,
          clear_for_s=60, message="free disk {value:.0f} MB below {threshold:g} MB",
          resolved_message="free disk back to {value:.0f} MB"),
    _rule("spool_dropping", "spool_dropped_delta", ">", 0.0, clear_for_s=300,
          message="spool dropped {value:g} messages at its storage cap",
          resolved_message="spool stopped dropping"),
    _rule("modem_signal_low", "modem_signal_pct", "<", 20.0, for_s=120, clear_threshold=30.0,
          clear_for_s=60, message="cellular signal {value:.0f}% below {threshold:g}%",
          resolved_message="cellular signal back to {value:.0f}%"),
    _boolean("audio_device_missing", "audio device missing", for_s=5, severity="critical"),
    _boolean("broker_unreachable", "broker unreachable for over {for_s:g} s", for_s=60),
)  # fmt: skip
DEFAULT_RULE_NAMES: frozenset[str] = frozenset(r.name for r in DEFAULT_RULES)
_DEFAULTS_BY_NAME: dict[str, AlertRule] = {r.name: r for r in DEFAULT_RULES}


# -- config ----------------------------------------------------------------------


class AlertRuleConfig(BaseModel):
    """One `[[alerts.rules]]` table: a new rule, or an override of a built-in by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    """false removes a built-in rule."""
    metric: str | None = None
    op: Op | None = None
    threshold: float | None = None
    for_s: float | None = Field(None, ge=0)
    clear_threshold: float | None = None
    clear_for_s: float | None = Field(None, ge=0)
    severity: Severity | None = None
    runbook: str | None = None
    """URL of the runbook; "" for none."""
    message: str | None = None
    resolved_message: str | None = None
    scope: Scope | None = None

    @model_validator(mode="after")
    def _buildable(self) -> AlertRuleConfig:
        if self.name not in DEFAULT_RULE_NAMES:
            missing = [k for k in ("metric", "op", "threshold") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"rule {self.name!r} is not built in, so it needs {', '.join(missing)}"
                )
        if self.enabled:
            _apply(_DEFAULTS_BY_NAME.get(self.name), self)  # each rule's problems, on its own key
        return self


class AlertsConfig(BaseModel):
    """The `[alerts]` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: bool = True
    """Include the built-in rules (docs/alerts.md); false keeps only the rules listed here."""
    failure_window_s: float = Field(3600.0, gt=0)
    """Rolling window of the call failure rate."""
    failure_min_calls: int = Field(5, ge=1)
    """Calls needed in the window before a failure rate is judged."""
    rules: list[AlertRuleConfig] = []

    @model_validator(mode="after")
    def _unique(self) -> AlertsConfig:
        names = [r.name for r in self.rules]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate rule names in alerts.rules: {', '.join(dups)}")
        return self


class AlertConfigError(ValueError):
    """Alert rules that cannot be built; `errors` lists every problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


_OVERRIDABLE = (
    "metric",
    "op",
    "threshold",
    "for_s",
    "clear_threshold",
    "clear_for_s",
    "severity",
    "message",
    "resolved_message",
    "scope",
)


def rules_from_config(cfg: AlertsConfig) -> list[AlertRule]:
    """Built-ins (when `defaults`) with per-name overrides applied, then the new rules.

    Overriding a built-in's `threshold` without its `clear_threshold` moves the
    clear threshold by the same amount, keeping the hysteresis gap.
    """
    errors: list[str] = []
    builtin = _DEFAULTS_BY_NAME
    chosen: dict[str, AlertRule] = dict(builtin) if cfg.defaults else {}
    seen: set[str] = set()
    for i, rc in enumerate(cfg.rules):
        where = f"alerts.rules[{i}] ({rc.name})"
        if rc.name in seen:
            errors.append(f"{where}: duplicate rule name")
            continue
        seen.add(rc.name)
        if not rc.enabled:
            chosen.pop(rc.name, None)
            continue
        try:
            chosen[rc.name] = _apply(builtin.get(rc.name), rc)
        except (ValueError, TypeError) as exc:
            errors.append(f"{where}: {exc}")
    if errors:
        raise AlertConfigError(errors)
    return list(chosen.values())


def _apply(base: AlertRule | None, rc: AlertRuleConfig) -> AlertRule:
    given = {k: getattr(rc, k) for k in _OVERRIDABLE if getattr(rc, k) is not None}
    runbook = None if rc.runbook == "" else rc.runbook
    if base is None:
        return AlertRule(name=rc.name, runbook=runbook, **given)
    if "runbook" in rc.model_fields_set:
        given["runbook"] = runbook
    if "threshold" in given and "clear_threshold" not in given and base.clear_threshold is not None:
        given["clear_threshold"] = base.clear_threshold + (given["threshold"] - base.threshold)
    return replace(base, **given)
