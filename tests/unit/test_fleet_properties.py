"""Properties of the fleet scheduler on random fleets (hypothesis): the product's
schedule never breaks a link budget, a host's capacity, a concurrency cap or an
affinity rule at any instant; it is never slower than one at a time; everything is
explained; and every move is either scheduled or refused with a reason."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmigrate.plan.fleet import (
    STRATEGIES,
    Fleet,
    Host,
    Link,
    Move,
    Vm,
    check_schedule,
    plan_evacuation,
    plan_rebalance,
    schedule,
)
from vmigrate.plan.fleet.model import units
from vmigrate.testing.fakefleet import LinearEstimator

GiB = 1 << 30
EST = LinearEstimator()
CAPACITIES = (12.5e6, 25e6, 62.5e6, 125e6, 1.25e9)  # 100 Mbit/s to 10 Gbit/s
BUDGETS = (0.25, 0.5, 0.8, 1.0)


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    n = draw(st.integers(2, 5))
    links: list[Link] = []
    spine = draw(st.booleans())  # a segment several hosts' traffic shares
    if spine:
        links.append(Link("spine", draw(st.sampled_from(CAPACITIES)),
                          draw(st.sampled_from(BUDGETS))))
    hosts = []
    for i in range(1, n + 1):
        name = f"h{i}"
        for d in ("up", "down"):
            links.append(Link(f"{name}-{d}", draw(st.sampled_from(CAPACITIES)),
                              draw(st.sampled_from(BUDGETS))))
        hosts.append(Host(
            name, memory=draw(st.integers(8, 64)) * GiB, cpus=draw(st.sampled_from((4, 8, 16))),
            reserve_memory=draw(st.integers(0, 2)) * GiB,
            state=draw(st.sampled_from(("active",) * 5 + ("draining", "maintenance"))),
            uplink=f"{name}-up",
            downlink="spine" if spine and draw(st.booleans()) else f"{name}-down",
            max_in=draw(st.integers(1, 3)), max_out=draw(st.integers(1, 3))))
    vms = []
    for j in range(draw(st.integers(0, 14))):
        rate = draw(st.sampled_from((0.0, 1e6, 10e6, 30e6, 80e6, 200e6)))
        vms.append(Vm(
            f"v{j}", host=draw(st.sampled_from([h.name for h in hosts])),
            memory=draw(st.integers(1, 8)) * GiB, cpus=draw(st.integers(1, 8)),
            dirty_rate=rate, wss=draw(st.sampled_from((0.0, 64e6, 512e6))),
            disk_bytes=draw(st.sampled_from((0, 2 * GiB, 20 * GiB))),
            mode=draw(st.sampled_from(("live", "live", "live", "online", "cold", "warm"))),
            group=draw(st.sampled_from((None,) * 6 + ("g1", "g2"))),
            affinity=draw(st.sampled_from((None,) * 8 + ("a1",))),
            anti_affinity=draw(st.sampled_from((None,) * 4 + ("x1", "x2"))),
            postcopy=draw(st.booleans())))
    return Fleet(hosts, links, vms)


@st.composite
def waves(draw: st.DrawFn) -> tuple[Fleet, list[Move]]:
    fleet = draw(fleets())
    names = [h.name for h in fleet.hosts]
    active = [h.name for h in fleet.active()] or names
    how = draw(st.sampled_from(("evacuate", "rebalance", "random")))
    if how == "evacuate":
        loaded = sorted({v.host for v in fleet.vms}) or names
        return fleet, plan_evacuation(fleet, draw(st.sampled_from(loaded)), EST).moves
    if how == "rebalance":
        return fleet, plan_rebalance(fleet, EST, max_moves=draw(st.integers(1, 6)),
                                     min_gain=draw(st.sampled_from((0.0, 0.01, 0.05)))).moves
    moves: list[Move] = []
    for unit in units(fleet.vms):
        if not draw(st.booleans()):
            continue
        dst = draw(st.sampled_from(names if draw(st.integers(0, 5)) == 0 else active))
        whole = draw(st.integers(0, 4)) > 0  # now and then only part of a unit moves
        for v in unit:
            if v.host != dst and (whole or draw(st.booleans())):
                moves.append(Move(v.name, v.host, dst))
    return fleet, moves


FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(waves())
def test_the_product_keeps_every_rule_at_every_instant(wave: tuple[Fleet, list[Move]]) -> None:
    fleet, moves = wave
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    # every move is scheduled or refused with a reason, once
    scheduled = [e.vm for e in s.entries]
    refused = [vm for vm, _ in s.refused]
    assert sorted(scheduled + refused) == sorted(m.vm for m in moves)
    assert all(reason for _, reason in s.refused)
    # what it starts, it finishes, above its floor all the way
    for e in s.entries:
        assert e.converges and e.why
        assert all(rate >= e.floor * (1 - 1e-9) for _, rate in e.allocations)
    for name, points in s.links.items():
        assert all(rate <= fleet.link(name).allowance * (1 + 1e-6) for _, rate in points)
    json.dumps(s.to_json())


@FAST
@given(waves())
def test_the_product_is_never_slower_than_one_at_a_time(wave: tuple[Fleet, list[Move]]
                                                        ) -> None:
    fleet, moves = wave
    product = schedule(fleet, moves, EST)
    sequential = schedule(fleet, moves, EST, "sequential")
    assert product.makespan_s <= sequential.makespan_s * (1 + 1e-9) + 1e-9


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(waves(), st.sampled_from(STRATEGIES), st.integers(0, 3))
def test_every_strategy_schedules_every_move_and_explains_it(
        wave: tuple[Fleet, list[Move]], strategy: str, seed: int) -> None:
    fleet, moves = wave
    s = schedule(fleet, moves, EST, strategy, seed=seed)  # type: ignore[arg-type]
    assert all(e.why for e in s.entries)
    if strategy != "vmigrate":
        assert sorted(e.vm for e in s.entries) == sorted(m.vm for m in moves)
    for e in s.entries:
        assert e.start_s <= e.end_s
        assert e.allocations[0][0] == e.start_s
    check_schedule(s, fleet)  # the checker copes with whatever a baseline did
    json.dumps(s.to_json())
