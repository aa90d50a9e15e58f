"""Alert rules: duration, hysteresis, no-data holds, call scope, failure rate, config."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from edgeagent.clock import FakeClock
from edgeagent.health.alerts import (
    DEFAULT_RULES,
    RUNBOOK_BASE,
    AlertChange,
    AlertConfigError,
    AlertRule,
    AlertRuleConfig,
    AlertRules,
    AlertsConfig,
    CounterIncrease,
    FailureRateWindow,
    rules_from_config,
    system_metrics,
)
from edgeagent.health.system import SystemSample, Throttled

T0 = 1_800_000_000.0  # FakeClock's default wall start


def make(
    *rules: AlertRule, clock: FakeClock | None = None
) -> tuple[AlertRules, list[AlertChange], FakeClock]:
    clock = clock or FakeClock()
    changes: list[AlertChange] = []
    return AlertRules(rules, clock, changes.append), changes, clock


def states(changes: list[AlertChange]) -> list[tuple[str, str, float | None]]:
    return [(c.name, c.state, c.value) for c in changes]


MOS = AlertRule(
    "mos_low",
    "mos",
    "<",
    3.0,
    for_s=10,
    clear_threshold=3.2,
    clear_for_s=10,
    message="MOS {value:.2f} below {threshold}",
    runbook="https://rb/mos_low",
    scope="call",
)
TEMP = AlertRule("temp_high", "temp_c", ">", 80.0, for_s=30, clear_threshold=75.0, clear_for_s=60)


# -- rule evaluation -----------------------------------------------------------------


async def test_fires_only_after_for_s_held() -> None:
    rules, changes, clock = make(TEMP)
    rules.observe("temp_c", 85.0)
    await clock.advance(29.0)
    rules.observe("temp_c", 86.0)
    assert changes == []
    await clock.advance(1.0)
    rules.observe("temp_c", 87.0)
    assert changes == [
        AlertChange(
            name="temp_high",
            state="firing",
            severity="warning",
            value=87.0,
            threshold=80.0,
            message="temp_c 87 > 80",
            runbook=None,
            since=T0,  # when the condition began, not when it was confirmed
            call_id=None,
        )
    ]
    assert rules.is_firing("temp_high")
    # Still bad: no second firing.
    await clock.advance(100.0)
    rules.observe("temp_c", 90.0)
    assert len(changes) == 1
    assert [(c.name, c.value) for c in rules.firing()] == [("temp_high", 90.0)]


async def test_a_good_value_resets_the_pending_timer() -> None:
    rules, changes, clock = make(TEMP)
    rules.observe("temp_c", 85.0)
    await clock.advance(20.0)
    rules.observe("temp_c", 70.0)  # the condition did not hold
    await clock.advance(5.0)
    rules.observe("temp_c", 85.0)
    await clock.advance(25.0)
    rules.observe("temp_c", 85.0)
    assert changes == []  # 25 s since the restart, not 50 s since the first
    await clock.advance(5.0)
    rules.observe("temp_c", 85.0)
    assert states(changes) == [("temp_high", "firing", 85.0)]
    assert changes[0].since == T0 + 25.0


async def test_hysteresis_does_not_flap_around_the_threshold() -> None:
    rules, changes, clock = make(TEMP)
    rules.observe("temp_c", 81.0)
    await clock.advance(30.0)
    rules.observe("temp_c", 81.0)
    assert states(changes) == [("temp_high", "firing", 81.0)]
    # Oscillating around 80 for ten minutes: between the thresholds, it stays firing.
    for i in range(120):
        await clock.advance(5.0)
        rules.observe("temp_c", 79.0 if i % 2 else 81.0)
    assert states(changes) == [("temp_high", "firing", 81.0)]
    # Dipping below the clear threshold briefly resets nothing but the clear timer.
    rules.observe("temp_c", 74.0)
    await clock.advance(59.0)
    rules.observe("temp_c", 76.0)  # back above 75: the clear timer restarts
    await clock.advance(10.0)
    rules.observe("temp_c", 74.0)
    await clock.advance(59.0)
    rules.observe("temp_c", 74.0)
    assert len(changes) == 1
    await clock.advance(1.0)
    rules.observe("temp_c", 73.0)
    assert states(changes) == [("temp_high", "firing", 81.0), ("temp_high", "resolved", 73.0)]
    assert changes[1].since == clock.time() - 60.0
    assert changes[1].message == "temp_high resolved (temp_c 73)"
    assert rules.firing() == []


async def test_none_holds_state_and_timers() -> None:
    rules, changes, clock = make(TEMP)
    rules.observe("temp_c", 85.0)
    await clock.advance(20.0)
    rules.observe("temp_c", None)  # no data: neither confirms nor resets
    await clock.advance(10.0)
    rules.observe("temp_c", None)
    assert changes == []
    rules.observe("temp_c", 85.0)
    assert states(changes) == [("temp_high", "firing", 85.0)]
    for _ in range(5):
        await clock.advance(60.0)
        rules.observe("temp_c", None)
    assert rules.is_firing("temp_high")
    assert len(changes) == 1
    rules.observe("temp_c", float("nan"))  # treated like no data
    assert len(changes) == 1


async def test_zero_durations_fire_and_resolve_at_once() -> None:
    rule = AlertRule("hot", "t", ">=", 1.0)
    rules, changes, _ = make(rule)
    rules.observe("t", 0.0)
    rules.observe("t", 1.0)
    rules.observe("t", 1.0)
    rules.observe("t", 0.0)
    rules.observe("t", 0.0)
    assert states(changes) == [("hot", "firing", 1.0), ("hot", "resolved", 0.0)]


async def test_other_metrics_and_unknown_metrics_are_ignored() -> None:
    rules, changes, _ = make(TEMP)
    rules.observe("mem_available_mb", 1.0)
    rules.observe("nope", 1e9)
    assert changes == []
    assert rules.metrics == frozenset({"temp_c"})


async def test_tick_confirms_a_duration_without_a_new_sample() -> None:
    rule = AlertRule("broker_unreachable", "broker_unreachable", ">=", 1.0, for_s=60)
    rules, changes, clock = make(rule)
    rules.observe("broker_unreachable", 1.0)  # observed once, on the disconnect
    await clock.advance(59.0)
    rules.tick()
    assert changes == []
    await clock.advance(1.0)
    rules.tick()
    assert states(changes) == [("broker_unreachable", "firing", 1.0)]
    assert changes[0].since == T0
    rules.observe("broker_unreachable", 0.0)
    assert states(changes)[-1] == ("broker_unreachable", "resolved", 0.0)


async def test_two_severity_rules_on_one_metric() -> None:
    warn = AlertRule("loss_high", "loss_pct", ">", 3.0, for_s=10, clear_threshold=2.0)
    crit = AlertRule(
        "loss_high_critical",
        "loss_pct",
        ">",
        10.0,
        for_s=10,
        clear_threshold=8.0,
        severity="critical",
    )
    rules, changes, clock = make(warn, crit)
    rules.observe("loss_pct", 5.0)
    await clock.advance(5.0)
    rules.observe("loss_pct", 15.0)
    await clock.advance(5.0)
    rules.observe("loss_pct", 15.0)  # warn held 10 s, critical only 5 s
    await clock.advance(5.0)
    rules.observe("loss_pct", 15.0)
    await clock.advance(5.0)
    rules.observe("loss_pct", 5.0)  # below 8: critical resolves at once; warning holds
    await clock.advance(5.0)
    rules.observe("loss_pct", 1.0)
    assert [(c.name, c.state, c.severity) for c in changes] == [
        ("loss_high", "firing", "warning"),
        ("loss_high_critical", "firing", "critical"),
        ("loss_high_critical", "resolved", "critical"),
        ("loss_high", "resolved", "warning"),
    ]


# -- call scope ----------------------------------------------------------------------


async def test_call_scoped_alerts_are_keyed_by_call_and_reset_at_call_end() -> None:
    rules, changes, clock = make(MOS, TEMP)
    rules.observe("mos", 2.5, call_id="c1")
    rules.observe("mos", 4.2, call_id="c2")
    rules.observe("temp_c", 90.0, call_id="c1")  # device scope: call id ignored
    await clock.advance(30.0)
    rules.observe("mos", 2.4, call_id="c1")
    rules.observe("mos", 4.2, call_id="c2")
    rules.observe("temp_c", 90.0)
    assert [(c.name, c.state, c.call_id) for c in changes] == [
        ("mos_low", "firing", "c1"),
        ("temp_high", "firing", None),
    ]
    assert changes[0].message == "MOS 2.40 below 3.0"
    assert changes[0].runbook == "https://rb/mos_low"
    rules.observe("mos", 2.0, call_id="c2")  # pending on c2 only
    rules.reset_scope("call", "c1")
    assert [(c.name, c.state, c.call_id, c.value) for c in changes[2:]] == [
        ("mos_low", "resolved", "c1", None),
    ]
    assert changes[2].message == "mos_low resolved: call ended"
    assert rules.is_firing("temp_high")  # device alerts survive the call
    # c2's pending state was not touched by c1's end...
    await clock.advance(10.0)
    rules.observe("mos", 2.0, call_id="c2")
    assert [(c.name, c.state, c.call_id) for c in changes[3:]] == [("mos_low", "firing", "c2")]
    # ...and reset without a call id clears every call; a pending one ends silently.
    rules.observe("mos", 2.0, call_id="c3")
    rules.reset_scope("call")
    assert [(c.name, c.state, c.call_id) for c in changes[4:]] == [("mos_low", "resolved", "c2")]
    await clock.advance(10.0)
    rules.observe("mos", 2.0, call_id="c3")  # c3 starts over
    assert len(changes) == 5
    assert [c.name for c in rules.firing()] == ["temp_high"]


# -- helpers -------------------------------------------------------------------------


async def test_failure_rate_window_fires_after_enough_failures_and_resolves() -> None:
    clock = FakeClock()
    window = FailureRateWindow(window_s=3600, min_calls=5, clock=clock)
    rule = next(r for r in DEFAULT_RULES if r.name == "call_failure_rate")
    rules, changes, _ = make(rule, clock=clock)

    def call(result: str) -> None:
        window.record_result(result)
        rules.observe("call_failure_rate", window.rate())

    for _ in range(3):
        call("failed")  # 100 % failed, but below min_calls: no judgement
    assert window.rate() is None
    assert changes == []
    call("rejected")  # a busy reject is not a failure of the device, nor a call counted
    call("completed")
    assert changes == []
    assert window.counts() == (4, 3)
    call("completed")  # 5 calls, 3 failed: 60 %
    assert states(changes) == [("call_failure_rate", "firing", 0.6)]
    assert changes[0].message == "call failure rate 60% above 10%"
    assert changes[0].severity == "critical"
    for _ in range(30):
        call("completed")  # 3/35 = 8.6 %: between clear (5 %) and threshold, still firing
    assert len(changes) == 1
    for _ in range(24):
        call("completed")  # 3/59 = 5.08 %: above the clear threshold, still firing
    assert len(changes) == 1
    call("completed")  # 3/60 = 5 %: at the clear threshold
    assert states(changes)[-1][:2] == ("call_failure_rate", "resolved")
    assert changes[-1].value == pytest.approx(0.05)
    assert changes[-1].message == "call failure rate back to 5%"


async def test_failure_rate_window_forgets_old_calls() -> None:
    clock = FakeClock()
    window = FailureRateWindow(window_s=600, min_calls=2, clock=clock)
    window.record(True)
    await clock.advance(300)
    window.record(False)
    assert window.rate() == 0.5
    await clock.advance(301)
    assert window.counts() == (1, 0)
    assert window.rate() is None  # below min_calls: the alert holds
    with pytest.raises(ValueError):
        FailureRateWindow(0, 1, clock)


def test_counter_increase() -> None:
    inc = CounterIncrease()
    assert inc.update(7) is None  # first reading: no baseline
    assert inc.update(7) == 0.0
    assert inc.update(10) == 3.0
    assert inc.update(None) is None
    assert inc.update(2) == 2.0  # counter restarted


def test_system_metrics_from_a_sample() -> None:
    sample = SystemSample(
        ts=0.0,
        uptime_s=1.0,
        cpu_pct=None,
        load_1m=None,
        mem_available_mb=40.0,
        mem_total_mb=1000.0,
        rss_mb=None,
        temp_c=81.5,
        thermal_zones={},
        throttled=Throttled(now=("throttled", "soft_temp_limit"), since_boot=(), raw=0xC),
        disk_free_mb=None,
        net={},
        board_model="x",
        num_fds=None,
        threads=None,
    )
    assert system_metrics(sample) == {
        "temp_c": 81.5,
        "mem_available_mb": 40.0,
        "disk_free_mb": None,
        "thermal_throttled": 1.0,
        "soft_temp_limit": 1.0,
        "under_voltage": 0.0,
        "modem_signal_pct": None,
    }


async def test_spool_dropping_default_rule_fires_on_increase() -> None:
    rule = next(r for r in DEFAULT_RULES if r.name == "spool_dropping")
    rules, changes, clock = make(rule)
    inc = CounterIncrease()
    for total in (0, 0, 12):
        rules.observe("spool_dropped_delta", inc.update(total))
    assert states(changes) == [("spool_dropping", "firing", 12.0)]
    for _ in range(10):  # the clear timer starts at the first quiet reading
        await clock.advance(30)
        rules.observe("spool_dropped_delta", inc.update(12))
    assert len(changes) == 1
    await clock.advance(30)
    rules.observe("spool_dropped_delta", inc.update(12))  # 300 s without drops
    assert states(changes)[-1] == ("spool_dropping", "resolved", 0.0)


# -- defaults and config -------------------------------------------------------------

EXPECTED_DEFAULTS = {
    "call_failure_rate",
    "mos_low",
    "loss_high",
    "loss_high_critical",
    "jitter_high",
    "rtt_high",
    "no_audio",
    "echo",
    "clipping",
    "high_noise",
    "thermal_throttled",
    "soft_temp_limit",
    "under_voltage",
    "temp_high",
    "memory_low",
    "disk_low",
    "spool_dropping",
    "modem_signal_low",
    "audio_device_missing",
    "broker_unreachable",
}


def test_default_rules_cover_the_issue_and_have_runbooks() -> None:
    assert {r.name for r in DEFAULT_RULES} == EXPECTED_DEFAULTS
    for rule in DEFAULT_RULES:
        assert rule.runbook == RUNBOOK_BASE + rule.name
        assert rule.render(1.0) and rule.render_resolved(1.0)
    assert rules_from_config(AlertsConfig()) == list(DEFAULT_RULES)


def test_default_rules_are_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "alerts.md").read_text()
    for rule in DEFAULT_RULES:
        assert f"| `{rule.name}` | `{rule.metric}` |" in doc, rule.name


def test_config_overrides_disables_and_adds_rules() -> None:
    cfg = AlertsConfig.model_validate(
        {
            "rules": [
                {"name": "mos_low", "threshold": 3.5, "severity": "critical"},
                {"name": "echo", "enabled": False},
                {"name": "disk_low", "runbook": ""},
                {
                    "name": "cpu_busy",
                    "metric": "cpu_pct",
                    "op": ">",
                    "threshold": 95,
                    "for_s": 60,
                    "message": "CPU {value:.0f}%",
                },
            ]
        }
    )
    rules = {r.name: r for r in rules_from_config(cfg)}
    assert "echo" not in rules
    mos = rules["mos_low"]
    assert (mos.threshold, mos.severity, mos.for_s) == (3.5, "critical", 10)
    assert mos.clear_threshold == pytest.approx(3.7)  # hysteresis gap of the built-in kept
    assert rules["disk_low"].runbook is None
    assert rules["cpu_busy"] == AlertRule(
        "cpu_busy", "cpu_pct", ">", 95.0, for_s=60, message="CPU {value:.0f}%"
    )
    assert list(rules)[-1] == "cpu_busy"


def test_config_without_defaults_keeps_only_listed_rules() -> None:
    cfg = AlertsConfig.model_validate({"defaults": False, "rules": [{"name": "mos_low"}]})
    assert [r.name for r in rules_from_config(cfg)] == ["mos_low"]
    assert rules_from_config(AlertsConfig(defaults=False)) == []


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"name": "x", "metric": "m", "op": ">"}, "needs threshold"),
        ({"name": "x", "metric": "m", "op": "!=", "threshold": 1}, "op"),
        ({"name": "Bad/Name", "metric": "m", "op": ">", "threshold": 1}, "name"),
        ({"name": "mos_low", "for_s": -1}, "for_s"),
        ({"name": "mos_low", "colour": "red"}, "colour"),
        ({"name": "mos_low", "clear_threshold": 2.0}, "clear_threshold 2 must be >= threshold 3"),
        ({"name": "mos_low", "message": "MOS {mos}"}, "message template"),
        ({"name": "mos_low", "severity": "fatal"}, "severity"),
    ],
)
def test_bad_rule_config_is_reported(rule: dict[str, object], expected: str) -> None:
    with pytest.raises(ValidationError) as err:
        AlertsConfig.model_validate({"rules": [rule]})
    assert expected in str(err.value)


def test_every_rule_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as err:
        AlertsConfig.model_validate(
            {
                "rules": [
                    {"name": "mos_low", "clear_threshold": 1.0},
                    {"name": "x", "metric": "m", "op": ">"},
                    {"name": "echo", "colour": 1},
                    {"name": "rtt_high", "message": "{nope}"},
                ]
            }
        )
    assert [e["loc"] for e in err.value.errors()] == [
        ("rules", 0),
        ("rules", 1),
        ("rules", 2, "colour"),
        ("rules", 3),
    ]


def test_rules_from_config_collects_problems_of_unvalidated_config() -> None:
    def raw(**kw: Any) -> AlertRuleConfig:
        return AlertRuleConfig.model_construct(**kw)  # as if validation were bypassed

    with pytest.raises(AlertConfigError) as err:
        rules_from_config(
            AlertsConfig.model_construct(
                defaults=True,
                rules=[
                    raw(name="mos_low", enabled=True, clear_threshold=1.0),
                    raw(name="echo", enabled=True),
                    raw(name="echo", enabled=True),
                    raw(name="rtt_high", enabled=True, message="{nope}"),
                ],
            )
        )
    assert [e.split(":")[0] for e in err.value.errors] == [
        "alerts.rules[0] (mos_low)",
        "alerts.rules[2] (echo)",
        "alerts.rules[3] (rtt_high)",
    ]
    assert "duplicate" in err.value.errors[1]
    with pytest.raises(ValidationError, match="duplicate rule names"):
        AlertsConfig.model_validate({"rules": [{"name": "echo"}, {"name": "echo"}]})


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="must be <= threshold"):
        AlertRule("x", "m", ">", 1.0, clear_threshold=2.0)
    with pytest.raises(ValueError, match="duplicate"):
        make(TEMP, TEMP)
