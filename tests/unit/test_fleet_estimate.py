"""The estimator the fleet plans through (``vmigrate.plan.fleet.estimate``): the models'
one on plain data, and a wave planned with it."""

from __future__ import annotations

import pytest

from vmigrate.plan.decide import Tier
from vmigrate.plan.fleet import (
    Fleet,
    FleetError,
    Host,
    Link,
    ModelEstimator,
    Move,
    Vm,
    check_schedule,
    schedule,
)
from vmigrate.plan.fleet.estimate import GRID, on_grid
from vmigrate.plan.predict import DEFAULT_PRIORS as P

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def est() -> ModelEstimator:
    return ModelEstimator()


def test_an_idle_guest_takes_its_memory_over_the_link(est: ModelEstimator) -> None:
    vm = Vm("idle", "h1", GiB)
    e = est.estimate(vm, 100 * MiB)
    assert e.converges and not e.postcopy
    # setup + one pass of its memory (and the switchover)
    assert e.time_s == pytest.approx(P.setup_s + GiB / (100 * MiB), rel=0.05)
    assert 0 < e.downtime_ms <= 300 and e.bytes >= GiB * 0.99
    assert est.estimate(vm, 400 * MiB).time_s < e.time_s


def test_min_bandwidth_is_where_a_plain_pre_copy_starts_to_converge(est: ModelEstimator
                                                                    ) -> None:
    vm = Vm("warmish", "h1", GiB, dirty_rate=20 * MiB, wss=256 * MiB, postcopy=False)
    floor = est.min_bandwidth(vm)
    assert 20 * MiB < floor < 40 * MiB
    assert est.estimate(vm, floor).converges
    assert not est.estimate(vm, floor * 0.9).converges
    assert est.min_bandwidth(vm) == floor  # cached


def test_a_guest_the_share_cannot_beat_goes_post_copy_or_does_not_converge(
        est: ModelEstimator) -> None:
    hot = Vm("hot", "h1", GiB, dirty_rate=60 * MiB, wss=512 * MiB)
    e = est.estimate(hot, 25 * MiB)
    assert e.converges and e.postcopy and e.downtime_ms >= P.postcopy_switch_ms
    stuck = est.estimate(Vm("hot", "h1", GiB, dirty_rate=60 * MiB, wss=512 * MiB,
                            postcopy=False), 25 * MiB)
    assert not stuck.converges and stuck.downtime_ms == 0
    assert stuck.time_s == pytest.approx(P.setup_s + est.budget_s)


def test_cold_moves_the_disks_only(est: ModelEstimator) -> None:
    vm = Vm("c", "h1", 8 * GiB, dirty_rate=50 * MiB, disk_bytes=10 * GiB, mode="cold")
    assert est.min_bandwidth(vm) == 0
    b = 100 * MiB
    e = est.estimate(vm, b)
    copy_s = 10 * GiB * (1 + P.stream_overhead) / b
    assert e.converges
    assert e.time_s == pytest.approx(P.setup_s + P.shutdown_s + P.copy_setup_s + P.boot_s
                                     + copy_s, rel=1 / 100)
    assert e.downtime_ms == pytest.approx((e.time_s - P.setup_s) * 1000)
    warm = est.estimate(Vm("w", "h1", 8 * GiB, disk_bytes=10 * GiB, mode="warm"), b)
    assert warm.downtime_ms < e.downtime_ms / 5


def test_online_adds_its_disks(est: ModelEstimator) -> None:
    live = est.estimate(Vm("v", "h1", GiB), 100 * MiB)
    online = est.estimate(Vm("v", "h1", GiB, disk_bytes=4 * GiB, mode="online"), 100 * MiB)
    assert online.time_s >= live.time_s + 4 * GiB / (100 * MiB) * 0.99
    assert online.bytes >= live.bytes + 4 * GiB
    assert online.downtime_ms > live.downtime_ms


def test_tiers_set_the_limits() -> None:
    est = ModelEstimator(tiers={"gold": Tier(name="gold", max_downtime_ms=100,
                                             postcopy=False)})
    vm = Vm("v", "h1", GiB, dirty_rate=60 * MiB, tier="gold")
    limits = est.limits(vm)
    assert limits.downtime_ms == 100 and not limits.postcopy
    assert not est.estimate(vm, 25 * MiB).converges
    with pytest.raises(FleetError, match="tier"):
        est.estimate(Vm("v", "h1", GiB, tier="bronze"), 25 * MiB)


def test_estimates_sit_on_a_grid_rounded_up(est: ModelEstimator) -> None:
    vm = Vm("g", "h1", GiB)
    step = on_grid(100e6)
    assert 100e6 <= step < 100e6 * GRID
    near = est.estimate(vm, step / GRID**0.5)  # rounded up to the same step
    assert near == est.estimate(vm, step)
    assert near.time_s <= P.setup_s + GiB / 100e6 + 1  # never slower than the rate asked
    assert not est.estimate(vm, 0).converges


def test_bad_settings_are_refused() -> None:
    with pytest.raises(FleetError):
        ModelEstimator(downtime_ms=0)
    with pytest.raises(FleetError):
        ModelEstimator(budget_s=float("inf"))


def test_a_wave_planned_with_the_models(est: ModelEstimator) -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16, state="draining"), Host("h2", 64 * GiB, 16),
                   Host("h3", 64 * GiB, 16)],
                  [Link(f"h{i}-{d}", 125e6, 0.8) for i in (1, 2, 3) for d in ("up", "down")],
                  [Vm("idle", "h1", 2 * GiB), Vm("busy", "h1", GiB, dirty_rate=30 * MiB,
                                                 wss=256 * MiB, postcopy=False),
                   Vm("db", "h1", 2 * GiB, dirty_rate=5 * MiB, wss=128 * MiB)])
    moves = [Move("idle", "h1", "h2"), Move("busy", "h1", "h3"), Move("db", "h1", "h2")]
    s = schedule(fleet, moves, est)
    assert check_schedule(s, fleet) == []
    assert not s.refused and all(e.converges for e in s.entries)
    assert s.makespan_s <= schedule(fleet, moves, est, "sequential").makespan_s
