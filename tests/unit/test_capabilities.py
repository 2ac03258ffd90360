"""The capabilities and parameters a migration starts with (plan_setup, throttle steps)."""

from __future__ import annotations

from typing import Any

import pytest

from vmigrate.errors import SpecError
from vmigrate.plan.capabilities import (
    HELD_THROTTLE,
    UNLIMITED_BANDWIDTH,
    MigrationOptions,
    plan_setup,
    throttle_parameters,
)
from vmigrate.plan.policy import BUILTIN, Policy

MiB = 1 << 20


# -- plan_setup ---------------------------------------------------------------------------------


def test_setup_balanced() -> None:
    setup = plan_setup(MigrationOptions(BUILTIN["balanced"]))
    assert setup.postcopy
    assert setup.capabilities == {"postcopy-ram": True, "auto-converge": True,
                                  "xbzrle": False, "multifd": False}
    assert setup.parameters["downtime-limit"] == 50
    assert setup.parameters["max-bandwidth"] == UNLIMITED_BANDWIDTH
    for name, value in HELD_THROTTLE.items():
        assert setup.parameters[name] == value
    assert setup.dest_parameters == {}


def test_setup_overrides_and_plain_policy() -> None:
    setup = plan_setup(MigrationOptions(BUILTIN["suspend"], downtime_ms=1000, bandwidth=10 * MiB))
    assert not setup.postcopy
    assert setup.capabilities["auto-converge"] is False
    assert setup.parameters == {"downtime-limit": 1000, "max-bandwidth": 10 * MiB}


def test_setup_multifd() -> None:
    setup = plan_setup(MigrationOptions(BUILTIN["suspend"], parallel=4, compress="zstd"))
    assert setup.capabilities["multifd"] and not setup.capabilities["postcopy-ram"]
    expected = {"multifd-channels": 4, "multifd-compression": "zstd"}
    assert setup.dest_parameters == expected
    assert expected.items() <= setup.parameters.items()


def test_setup_complete_without_postcopy_step_allows_multifd() -> None:
    policy = Policy(name="p", timeout_action="complete")
    setup = plan_setup(MigrationOptions(policy, parallel=2))
    assert not setup.postcopy


@pytest.mark.parametrize("opts", [
    {"policy": BUILTIN["balanced"], "parallel": 4},           # multifd + postcopy step
    {"policy": BUILTIN["postcopy"], "parallel": 2},
    {"policy": BUILTIN["suspend"], "parallel": 4, "compress": "xbzrle"},
    {"policy": BUILTIN["suspend"], "compress": "zstd"},       # zstd needs multifd
    {"policy": BUILTIN["suspend"], "parallel": 1},
    {"policy": BUILTIN["suspend"], "parallel": 256},
    {"policy": BUILTIN["suspend"], "downtime_ms": -5},
    {"policy": BUILTIN["suspend"], "downtime_ms": 2_000_001},
    {"policy": BUILTIN["suspend"], "bandwidth": 0},
    {"policy": BUILTIN["suspend"], "compress": "lz4"},
])
def test_setup_refuses(opts: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        plan_setup(MigrationOptions(**opts))


def test_setup_refuses_old_qemu() -> None:
    with pytest.raises(SpecError):
        plan_setup(MigrationOptions(BUILTIN["suspend"], parallel=2, compress="zstd"), (4, 2, 0))
    old = plan_setup(MigrationOptions(BUILTIN["balanced"]), (4, 2, 0))
    assert "throttle-trigger-threshold" not in old.parameters

def test_throttle_increment_floor() -> None:
    assert throttle_parameters(6)["cpu-throttle-increment"] == 5
    assert throttle_parameters(99)["cpu-throttle-increment"] == 49
