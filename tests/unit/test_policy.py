"""Convergence policies: the built-ins, describe, bandwidth, loading and resolving tables."""

from __future__ import annotations

from typing import Any

import pytest

from vmigrate.errors import ConfigError, NotFoundError, SpecError
from vmigrate.plan.policy import (
    BUILTIN,
    describe,
    load_policies,
    parse_bandwidth,
    resolve_policy,
)

MiB = 1 << 20
GiB = 1 << 30


# -- built-ins, describe ----------------------------------------------------------------------


def test_builtins() -> None:
    assert {"balanced", "minimal-downtime", "postcopy", "suspend"} <= set(BUILTIN)
    for name, policy in BUILTIN.items():
        assert policy.name == name and policy.description
        assert describe(policy).startswith(name + ":")
        assert "\n" not in describe(policy)
    balanced = BUILTIN["balanced"]
    assert [s.action for s in balanced.steps] == ["downtime", "downtime", "throttle", "postcopy"]
    assert balanced.timeout_action == "complete"


# -- bandwidth --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("100M", 100 * MiB), ("100MB", 100 * MiB), ("100MiB/s", 100 * MiB), ("1G", GiB),
    ("512", 512), ("1.5K", 1536), ("800mbit", 100_000_000), ("1Gbit/s", 125_000_000),
    ("100mbps", 12_500_000), ("8bit", 1), (" 2 t ", 2 << 40),
])
def test_parse_bandwidth(text: str, value: int) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1M", "0", "1X", "1 parsec", "0.01", "M", "1e3"])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_bandwidth(text)


# -- loading and resolving ----------------------------------------------------------------------


def test_load_policies() -> None:
    raw: dict[str, dict[str, Any]] = {
        "gentle": {
            "description": "slow link",
            "downtime_ms": 500,
            "bandwidth": "50M",
            "steps": [
                {"after_stalls": 3, "action": "downtime", "value": 1000},
                {"after_stalls": 2, "action": "throttle", "value": 30},
                {"after_stalls": 2, "action": "abort"},
            ],
            "timeout_s": 120,
        },
        "balanced": {"downtime_ms": 100},
    }
    policies = load_policies(raw)
    gentle = policies["gentle"]
    assert gentle.name == "gentle" and gentle.bandwidth == 50 * MiB
    assert [s.action for s in gentle.steps] == ["downtime", "throttle", "abort"]
    assert gentle.timeout_action == "abort"
    # user policies shadow built-ins
    assert resolve_policy("balanced", policies).downtime_ms == 100
    assert resolve_policy("suspend", policies) is BUILTIN["suspend"]
    with pytest.raises(NotFoundError):
        resolve_policy("nope", policies)


@pytest.mark.parametrize("table", [
    {"downtime": 300},                                                   # unknown field
    {"downtime_ms": -1},
    {"downtime_ms": 3_000_000},
    {"bandwidth": "lots"},
    {"bandwidth": 0},
    {"timeout_s": 0},
    {"timeout_action": "pause"},
    {"stall_ratio": -0.5},
    {"steps": [{"after_stalls": 0, "action": "pause"}]},
    {"steps": [{"after_stalls": 1, "action": "migrate"}]},
    {"steps": [{"after_stalls": 1, "action": "throttle"}]},              # needs a value
    {"steps": [{"after_stalls": 1, "action": "throttle", "value": 100}]},
    {"steps": [{"after_stalls": 1, "action": "downtime"}]},
    {"steps": [{"after_stalls": 1, "action": "postcopy", "value": 3}]},  # takes none
    {"steps": [{"after_stalls": 1, "action": "abort"}, {"after_stalls": 1, "action": "pause"}]},
    {"steps": [{"after_stalls": 1, "action": "pause", "extra": 1}]},
    {"name": "other"},
])
def test_load_policies_rejects(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_policies({"bad": table})


def test_load_policies_rejects_non_table() -> None:
    with pytest.raises(ConfigError):
        load_policies({"bad": "balanced"})  # type: ignore[dict-item]
