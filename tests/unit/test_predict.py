"""The prediction models, their calibration, and the simulation behind live migration.

Expected figures are worked out by hand from the priors (link efficiency 0.95,
setup 2 s, switchover 60 ms, post-copy switch 150 ms, handover 100 ms, shutdown
3 s, boot 8 s, copy setup 1.5 s, stream overhead 0.002, warm granularity 1.5).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmigrate.errors import SpecError
from vmigrate.migration import storage as cold
from vmigrate.migration.report import DiskFigures, MemoryFigures, MigrationReport, load_report
from vmigrate.plan.assessment import (
    MODES,
    Assessment,
    DirtyWindow,
    DiskAssessment,
    Figures,
    LinkAssessment,
    Mode,
    ModePrediction,
)
from vmigrate.plan.capabilities import MigrationOptions, plan_setup
from vmigrate.plan.convergence import ConvergenceController
from vmigrate.plan.policy import BUILTIN, Policy, Step
from vmigrate.plan.predict import (
    DEFAULT_PRIORS,
    FACTOR_MAX,
    FACTOR_MIN,
    PRIOR_SPREAD,
    Calibration,
    Factors,
    HistoryEntry,
    Priors,
    calibrate,
    measured_figures,
    predict,
)
from vmigrate.plan.simulate import SimulatedMigration, drive, drive_sparse

MiB = 1 << 20
GiB = 1 << 30
LINK = 100 * MiB
#: what the models use of LINK (link_efficiency 0.95)
B = 0.95 * LINK
#: one simulation tick: QEMU's pass-end checks
TICK = 0.01
OVH = 1.002


def disk(device: str = "vda", *, alloc: int = GiB, virt: int = 10 * GiB, write: float = 0.0,
         ratio: float | None = None, shared: bool = False) -> DiskAssessment:
    return DiskAssessment(device=device, path=f"/img/{device}.qcow2", format="qcow2",
                          virtual_bytes=virt, allocated_bytes=alloc, write_rate=write,
                          compress_ratio=ratio, shared=shared)


def assess(*, dirty: float | tuple[tuple[float, float], ...] | None = None,
           memory: int = GiB, disks: tuple[DiskAssessment, ...] = (), running: bool = True,
           link: float | None = LINK, qemu: tuple[int, int, int] | None = (7, 2, 0),
           wss: int | None = None) -> Assessment:
    if dirty is None:
        windows: tuple[DirtyWindow, ...] = ()
    elif isinstance(dirty, tuple):
        windows = tuple(DirtyWindow(seconds=s, rate=r) for s, r in dirty)
    else:
        windows = (DirtyWindow(seconds=1.0, rate=dirty),)
    return Assessment(
        vm="vm1", host="src", at=1000.0, running=running, memory_bytes=memory,
        qemu_version=qemu if running else None, dirty=windows, dirty_set_bytes=wss,
        disks=disks,
        link=None if link is None else LinkAssessment(source="src", dest="dst", bandwidth=link))


def shared(**kw: Any) -> Assessment:
    """A VM whose one disk is on shared storage (live is possible)."""
    return assess(disks=(disk(shared=True),), **kw)


def run(a: Assessment, policy: str | Policy = "balanced",
        **kw: Any) -> dict[Mode, ModePrediction]:
    pol = BUILTIN[policy] if isinstance(policy, str) else policy
    return predict(a, policy=pol, **kw)


def raw(p: ModePrediction) -> Figures:
    assert p.feasible, p.reason
    assert p.raw is not None and p.figures is not None
    return p.raw


# -- priors -----------------------------------------------------------------------------------


def test_priors_restate_the_warm_constants() -> None:
    assert DEFAULT_PRIORS.warm_small_delta == cold.SMALL_DELTA
    assert DEFAULT_PRIORS.warm_max_rounds == cold.MAX_ROUNDS
    assert Priors() == DEFAULT_PRIORS
    with pytest.raises(ValueError):
        Priors(link_efficiency=0)
    with pytest.raises(ValueError):
        Priors(first_pass_fraction=1.5)


# -- feasibility ------------------------------------------------------------------------------


def test_every_mode_is_predicted_and_round_trips_json() -> None:
    out = run(shared(dirty=20 * MiB))
    assert tuple(out) == MODES
    for mode, p in out.items():
        assert p.mode == mode and p.feasible
        assert ModePrediction.model_validate_json(p.model_dump_json()) == p


def test_no_link_makes_every_mode_infeasible() -> None:
    out = run(shared(link=None))
    for p in out.values():
        assert not p.feasible and p.reason and "no link" in p.reason
        assert p.figures is None and p.raw is None


def test_stopped_vm_only_cold() -> None:
    a = assess(running=False, disks=(disk(alloc=GiB),))
    out = run(a)
    assert [m for m, p in out.items() if p.feasible] == ["cold"]
    c = raw(out["cold"])
    # no shutdown, no boot: setup + copy setup + copy; no downtime
    assert c.downtime_ms == 0
    assert c.total_time_s == pytest.approx(2 + 1.5 + GiB * OVH / B)
    assert c.wire_bytes == round(GiB * OVH)


def test_live_needs_shared_storage() -> None:
    out = run(assess(disks=(disk(shared=True), disk("vdb", shared=False))))
    assert not out["live"].feasible and out["live"].reason is not None
    assert out["online"].feasible and out["cold"].feasible and out["warm"].feasible


def test_warm_needs_qemu_5() -> None:
    assert not run(assess(disks=(disk(),), qemu=(4, 2, 0)))["warm"].feasible
    assert run(assess(disks=(disk(),), qemu=(5, 0, 0)))["warm"].feasible
    unknown = run(assess(disks=(disk(),), qemu=None))["warm"]
    assert unknown.feasible and any("unknown" in n for n in unknown.notes)


def test_bad_downtime_or_bandwidth_is_refused() -> None:
    with pytest.raises(SpecError):
        run(shared(), downtime_ms=3_000_000)
    with pytest.raises(SpecError):
        run(shared(), bandwidth=0)


# -- live ----------------------------------------------------------------------------------------


def test_live_idle_guest_one_pass() -> None:
    p = run(shared(dirty=0.0))["live"]
    fig = raw(p)
    # balanced: 50 ms limit; the pass ends at the first tick with <= B x 50 ms left
    threshold = B * 0.05
    assert fig.total_time_s == pytest.approx(2 + (GiB - threshold) / B, abs=TICK + 1e-6)
    # what is left (up to one tick under the threshold) goes in the downtime, + 60 ms
    assert 60 + 50 - TICK * 1000 < fig.downtime_ms <= 60 + 50 + 1e-6
    assert fig.wire_bytes == GiB
    assert p.iterations == 2 and p.converges and not p.postcopy and not p.aborts
    assert p.steps == ()
    assert p.notes[0] == "first pass 1024.0 MiB at 95.0 MiB/s"


def test_live_no_dirty_measurement_is_idle() -> None:
    p = run(shared(dirty=None))["live"]
    assert raw(p) == raw(run(shared(dirty=0.0))["live"])
    assert any("assumed idle" in n for n in p.notes)


def test_live_first_pass_fraction() -> None:
    half = run(shared(dirty=0.0), priors=Priors(first_pass_fraction=0.5))["live"]
    assert raw(half).wire_bytes == GiB // 2
    assert raw(half).total_time_s == pytest.approx(2 + (GiB / 2 - B * 0.05) / B,
                                                    abs=TICK + 1e-6)


def test_live_dirty_above_link_balanced_needs_postcopy() -> None:
    p = run(shared(dirty=200 * MiB, wss=256 * MiB))["live"]
    fig = raw(p)
    assert p.postcopy and not p.converges and not p.aborts
    assert fig.downtime_ms == 150  # the post-copy switch, nothing paused
    assert fig.wire_bytes > GiB + 256 * MiB
    assert fig.total_time_s < 600  # well before the timeout
    # every step of the schedule fired, in order
    assert len(p.steps) == 4
    for step, text in zip(p.steps, ("300 ms", "600 ms", "throttle", "post-copy"), strict=True):
        assert text in step


def test_live_dirty_above_link_aborts_at_timeout_without_steps() -> None:
    policy = Policy(name="never", timeout_s=30, timeout_action="abort")
    p = run(shared(dirty=200 * MiB), policy)["live"]
    fig = raw(p)
    assert p.aborts and not p.converges and not p.postcopy
    # cancelled at the first sample at or after 30 s (samples come every 0.5 s after
    # the last pass end); the source ran on
    assert 2 + 30 <= fig.total_time_s < 2 + 30.5
    assert fig.downtime_ms == 0
    assert fig.wire_bytes == pytest.approx(B * (fig.total_time_s - 2), rel=0.001)


def test_live_abort_step() -> None:
    policy = Policy(name="give-up", steps=(Step(after_stalls=2, action="abort"),))
    p = run(shared(dirty=200 * MiB, wss=256 * MiB), policy)["live"]
    assert p.aborts and raw(p).downtime_ms == 0
    assert len(p.steps) == 1 and "cancel" in p.steps[0]
    assert raw(p).total_time_s < 100


def test_live_suspend_pauses() -> None:
    p = run(shared(dirty=200 * MiB, wss=256 * MiB), "suspend")["live"]
    fig = raw(p)
    assert p.postcopy and not p.converges and not p.aborts
    # paused with about a working set to send: seconds of downtime
    assert fig.downtime_ms > 1000
    assert len(p.steps) == 1 and "pause" in p.steps[0]


def test_live_never_finishing_without_timeout_is_infeasible() -> None:
    policy = Policy(name="forever", timeout_s=math.inf)
    p = run(shared(dirty=200 * MiB), policy)["live"]
    assert not p.feasible and not p.converges and p.figures is None


def test_live_peak_dirty_rate_is_told() -> None:
    # mean 29 MiB/s converges; the 200 MiB/s peak would run into the timeout
    policy = Policy(name="strict", timeout_s=60, timeout_action="abort")
    a = shared(dirty=((9.0, 10 * MiB), (1.0, 200 * MiB)))
    p = run(a, policy)["live"]
    assert p.converges and not p.aborts
    peak = [n for n in p.notes if n.startswith("at the peak dirty rate 200.0 MiB/s")]
    assert len(peak) == 1 and "cancel" in peak[0]


def test_live_bandwidth_cap() -> None:
    capped = run(shared(dirty=0.0), bandwidth=10 * MiB)["live"]
    threshold = 10 * MiB * 0.05
    assert raw(capped).total_time_s == pytest.approx(2 + (GiB - threshold) / (10 * MiB),
                                                      abs=TICK + 1e-6)
    assert capped.notes[0] == "first pass 1024.0 MiB at 10.0 MiB/s"
    # a policy's cap applies too, and the option overrides it
    policy = BUILTIN["balanced"].model_copy(update={"bandwidth": 10 * MiB})
    assert raw(run(shared(dirty=0.0), policy)["live"]) == raw(capped)
    # a cap above the link changes nothing
    assert raw(run(shared(dirty=0.0), bandwidth=GiB)["live"]) == raw(run(shared(dirty=0.0))["live"])


def test_live_zero_memory() -> None:
    p = run(shared(memory=0, dirty=0.0))["live"]
    assert raw(p).wire_bytes == 0 and p.converges
    assert raw(p).total_time_s == pytest.approx(2, abs=TICK + 1e-6)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(d1=st.floats(0, 200 * MiB), more=st.floats(1.0, 2.0),
       memory=st.sampled_from([64 * MiB, 256 * MiB, GiB]),
       policy=st.sampled_from(["no-steps", "postcopy"]))
def test_live_more_dirt_never_faster(d1: float, more: float, memory: int, policy: str) -> None:
    # without stall-driven steps; with them a higher dirty rate may move to post-copy
    # sooner and finish earlier (by design)
    pol = Policy(name="no-steps", timeout_s=120, timeout_action="complete") \
        if policy == "no-steps" else BUILTIN[policy]
    slow = raw(run(shared(memory=memory, dirty=d1), pol)["live"])
    fast = raw(run(shared(memory=memory, dirty=d1 * more), pol)["live"])
    assert fast.total_time_s >= slow.total_time_s - TICK - 1e-6


# -- online --------------------------------------------------------------------------------------


def test_online_mirror_then_memory() -> None:
    w = 5 * MiB
    a = assess(dirty=0.0, disks=(disk(alloc=2 * GiB, write=w),))
    p = run(a)["online"]
    fig = raw(p)
    mirror_s = 2 * GiB / (B - w)
    live_s = (GiB - (B - w) * 0.05) / (B - w)  # the memory pass on what the mirror leaves
    assert fig.total_time_s == pytest.approx(2 + 3 + mirror_s + live_s, abs=TICK + 1e-6)
    assert 60 + 100 + 50 - TICK * 1000 < fig.downtime_ms <= 60 + 100 + 50 + 1e-6
    wire = 2 * GiB + w * mirror_s + GiB + w * live_s
    assert fig.wire_bytes == pytest.approx(wire, rel=1e-4)
    assert p.converges and not p.postcopy


def test_online_disk_writes_at_link_never_ready() -> None:
    a = assess(dirty=0.0, disks=(disk(write=B),))
    p = run(a)["online"]
    assert not p.feasible and not p.converges and p.reason is not None


def test_online_no_disks() -> None:
    # nothing to mirror: online is live plus the handover
    a = assess(dirty=0.0)
    out = run(a)
    on, live = raw(out["online"]), raw(out["live"])
    assert on.total_time_s == pytest.approx(live.total_time_s)
    assert on.downtime_ms == pytest.approx(live.downtime_ms + 100)
    assert on.wire_bytes == live.wire_bytes


# -- cold ----------------------------------------------------------------------------------------


def test_cold_by_hand() -> None:
    a = assess(disks=(disk(alloc=GiB, ratio=0.5), disk("vdb", alloc=512 * MiB)))
    p = run(a)["cold"]
    fig = raw(p)
    data = (GiB * 0.5 + 512 * MiB) * OVH
    down = 3 + 1.5 + data / B + 8
    assert fig.wire_bytes == round(data)
    assert fig.downtime_ms == pytest.approx(down * 1000)
    assert fig.total_time_s == pytest.approx(2 + down)
    assert p.converges and not p.postcopy and p.iterations is None


def test_cold_shutdown_timeout_caps_the_shutdown() -> None:
    a = assess(disks=(disk(alloc=GiB),))
    full = raw(run(a)["cold"])
    short = raw(run(a, shutdown_timeout=1.0)["cold"])
    assert full.downtime_ms - short.downtime_ms == pytest.approx(2000)


def test_cold_compression_ratio() -> None:
    plain = raw(run(assess(disks=(disk(alloc=4 * GiB),)))["cold"])
    packed = raw(run(assess(disks=(disk(alloc=4 * GiB, ratio=0.25),)))["cold"])
    assert packed.wire_bytes == round(4 * GiB * 0.25 * OVH)
    assert plain.wire_bytes == round(4 * GiB * OVH)
    assert plain.total_time_s - packed.total_time_s == pytest.approx(4 * GiB * 0.75 * OVH / B)


def test_cold_bandwidth_cap_is_per_disk() -> None:
    one = raw(run(assess(disks=(disk(alloc=GiB),)), bandwidth=10 * MiB)["cold"])
    assert one.total_time_s == pytest.approx(2 + 3 + 1.5 + GiB * OVH / (10 * MiB) + 8)
    # two disks at 10 MiB/s each fit the link side by side: same time
    two = raw(run(assess(disks=(disk(alloc=GiB), disk("vdb", alloc=GiB))),
                  bandwidth=10 * MiB)["cold"])
    assert two.total_time_s == pytest.approx(one.total_time_s)
    assert abs(two.wire_bytes - 2 * one.wire_bytes) <= 1
    # at 60 MiB/s each they share the link (47.5 each) until the small one is done,
    # then the big one runs alone at its cap
    mixed = raw(run(assess(disks=(disk(alloc=GiB), disk("vdb", alloc=3 * GiB))),
                    bandwidth=60 * MiB)["cold"])
    copy_s = GiB * OVH / (B / 2) + 2 * GiB * OVH / (60 * MiB)
    assert mixed.total_time_s == pytest.approx(2 + 3 + 1.5 + copy_s + 8)


def test_cold_and_warm_with_empty_or_no_disks() -> None:
    for disks in ((), (disk(alloc=0, virt=0, write=MiB),)):
        out = run(assess(disks=disks))
        c, w = raw(out["cold"]), raw(out["warm"])
        assert c.wire_bytes == 0 and w.wire_bytes == 0
        assert c.total_time_s == pytest.approx(2 + 3 + 1.5 + 8)
        # base copy, one empty round, cutover: three copy setups
        assert w.total_time_s == pytest.approx(2 + 1.5 + 1.5 + 3 + 1.5 + 8)
        assert out["warm"].iterations == 1
        assert raw(out["online"]).wire_bytes == raw(out["live"]).wire_bytes \
            if out["live"].feasible else True


@settings(max_examples=40, deadline=None, derandomize=True)
@given(link=st.floats(MiB, 10 * GiB), slower=st.floats(0.1, 1.0),
       allocs=st.lists(st.integers(0, 8 * GiB), max_size=4),
       cap=st.none() | st.integers(MiB, GiB), running=st.booleans())
def test_cold_slower_link_never_faster(link: float, slower: float, allocs: list[int],
                                       cap: int | None, running: bool) -> None:
    disks = tuple(disk(f"vd{i}", alloc=n, virt=n) for i, n in enumerate(allocs))
    fast = raw(run(assess(disks=disks, link=link, running=running), bandwidth=cap)["cold"])
    slow = raw(run(assess(disks=disks, link=link * slower, running=running),
                   bandwidth=cap)["cold"])
    assert slow.total_time_s >= fast.total_time_s - 1e-9
    assert slow.wire_bytes == fast.wire_bytes


# -- warm ----------------------------------------------------------------------------------------


def test_warm_by_hand() -> None:
    w, ratio = 5 * MiB, 0.5
    a = assess(disks=(disk(alloc=2 * GiB, write=w, ratio=ratio),))
    p = run(a)["warm"]
    fig = raw(p)
    per = ratio * OVH
    base_s = 1.5 + 2 * GiB * per / B
    r1 = w * base_s * 1.5  # 92 MiB: above 32 MiB, another round
    r1_s = 1.5 + r1 * per / B
    r2 = w * r1_s * 1.5  # 15 MiB: small enough, cut over
    r2_s = 1.5 + r2 * per / B
    assert r1 > 32 * MiB >= r2
    last = w * (r2_s + 3) * 1.5  # written in the last round and the shutdown
    down = 3 + 1.5 + last * per / B + 8
    assert p.iterations == 2
    assert fig.downtime_ms == pytest.approx(down * 1000)
    assert fig.total_time_s == pytest.approx(2 + base_s + r1_s + r2_s + down)
    assert fig.wire_bytes == pytest.approx((2 * GiB + r1 + r2 + last) * per, abs=1)
    assert len(p.steps) == 3  # two rounds and the cutover


def test_warm_writes_above_link_rounds_do_not_shrink() -> None:
    a = assess(disks=(disk(alloc=GiB, virt=4 * GiB, write=200 * MiB),))
    p = run(a)["warm"]
    fig = raw(p)
    assert p.iterations == 8
    assert any("do not shrink" in n and "exceed" in n for n in p.notes)
    # the rounds are capped at the virtual size: 4 GiB each from the second on
    assert fig.wire_bytes > (GiB + 7 * 4 * GiB) * OVH
    cold_down = raw(run(a)["cold"]).downtime_ms
    assert fig.downtime_ms > cold_down  # the last delta is bigger than the allocated data


def test_warm_idle_disks_one_round() -> None:
    a = assess(disks=(disk(alloc=GiB),))
    p = run(a)["warm"]
    fig = raw(p)
    assert p.iterations == 1
    assert fig.wire_bytes == round(GiB * OVH)
    # downtime: no delta to send
    assert fig.downtime_ms == pytest.approx((3 + 1.5 + 8) * 1000)
    assert fig.downtime_ms < raw(run(a)["cold"]).downtime_ms


# -- calibration -----------------------------------------------------------------------------


def entry(mode: str = "live", vm: str = "vm1", at: float = 0.0, *,
          raw_: tuple[float, float, int] = (10.0, 100.0, 1000),
          measured: tuple[float, float, int] = (10.0, 100.0, 1000)) -> HistoryEntry:
    return HistoryEntry.model_validate({
        "mode": mode, "vm": vm, "at": at,
        "raw": {"total_time_s": raw_[0], "downtime_ms": raw_[1], "wire_bytes": raw_[2]},
        "measured": {"total_time_s": measured[0], "downtime_ms": measured[1],
                     "wire_bytes": measured[2]}})


def test_calibrate_no_history() -> None:
    cal = calibrate([])
    assert cal == Calibration()
    assert cal.factors("live") == Factors()
    a = shared(dirty=20 * MiB)
    plain = run(a)
    for p in run(a, calibration=cal).values():
        assert p.figures == p.raw == plain[p.mode].raw
        assert p.uncertainty is None


def test_calibrate_factors_and_spread() -> None:
    history = [entry(at=i, measured=(t, 200.0, 1000)) for i, t in enumerate((12.0, 15.0, 18.0))]
    cal = calibrate(history)
    f = cal.factors("live")
    assert (f.total_time_s, f.downtime_ms, f.wire_bytes) == (1.5, 2.0, 1.0)
    assert f.samples == 3
    # time off by 0.2, 0, 0.2 of the calibrated figure; the others exact
    assert f.spread == pytest.approx(0.2)
    assert cal.factors("cold") == Factors()

    a = shared(dirty=20 * MiB)
    out = run(a, calibration=cal)
    live = out["live"]
    r = raw(live)
    assert live.figures == Figures(total_time_s=r.total_time_s * 1.5,
                                   downtime_ms=r.downtime_ms * 2, wire_bytes=r.wire_bytes)
    assert live.uncertainty == pytest.approx(0.2)
    assert any(n.startswith("calibrated on 3 migrations") for n in live.notes)
    assert out["cold"].figures == out["cold"].raw and out["cold"].uncertainty is None


def test_calibration_moves_predictions_toward_measured() -> None:
    a = assess(disks=(disk(alloc=GiB),))
    first = raw(run(a)["cold"])
    # this site's migrations take 30 % longer and pause 10 % less than the model says
    measured = (first.total_time_s * 1.3, first.downtime_ms * 0.9, first.wire_bytes)
    history = [entry("cold", at=i, raw_=(first.total_time_s, first.downtime_ms,
                                         first.wire_bytes), measured=measured)
               for i in range(4)]
    again = run(a, calibration=calibrate(history))["cold"]
    assert again.raw == first
    assert again.figures is not None
    assert again.figures.total_time_s == pytest.approx(measured[0])
    assert again.figures.downtime_ms == pytest.approx(measured[1])
    assert again.uncertainty == pytest.approx(0.0)


def test_calibrate_prefers_the_vms_own_history() -> None:
    history = [entry(vm="a", at=1, measured=(20.0, 100.0, 1000)),
               entry(vm="a", at=2, measured=(20.0, 100.0, 1000)),
               *[entry(vm="c", at=3 + i) for i in range(3)],
               entry(vm="b", at=10, measured=(40.0, 100.0, 1000))]
    assert calibrate(history, vm="a").factors("live").total_time_s == 2.0
    assert calibrate(history, vm="a").factors("live").samples == 2
    # b has one migration of its own: everyone's count; ratios 2, 2, 1, 1, 1, 4
    assert calibrate(history, vm="b").factors("live").total_time_s == 1.5
    assert calibrate(history).factors("live").samples == 6


def test_calibrate_uses_the_latest() -> None:
    old = [entry(at=i) for i in range(10)]
    new = [entry(at=100 + i, measured=(30.0, 100.0, 1000)) for i in range(5)]
    assert calibrate(old + new, last=5).factors("live").total_time_s == 3.0
    assert calibrate(new + old, last=15).factors("live").total_time_s == 1.0
    with pytest.raises(ValueError):
        calibrate(old, last=0)


def test_calibrate_clamps_and_ignores_zero_raw() -> None:
    history = [entry(at=i, raw_=(10.0, 0.0, 1000), measured=(1000.0, 50.0, 1))
               for i in range(3)]
    f = calibrate(history).factors("live")
    assert f.total_time_s == FACTOR_MAX and f.wire_bytes == FACTOR_MIN
    assert f.downtime_ms == 1.0  # every raw downtime was 0: nothing to learn


def test_calibrate_spread_needs_three() -> None:
    history = [entry(at=i, measured=(10.0 * (i + 1), 100.0, 1000)) for i in range(2)]
    f = calibrate(history).factors("live")
    assert f.samples == 2 and f.spread == PRIOR_SPREAD  # stated, not measured
    assert f.total_time_s == 1.5
    single = calibrate(history[:1]).factors("live")
    assert single.total_time_s == 1.0 and single.spread is None


# -- measured figures ------------------------------------------------------------------------


def report(mode_: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"job": "j1", "vm": "vm1", "mode": mode_, "source": "src",
                            "dest": "dst", "status": "completed", "total_time_s": 12.5,
                            "observed_downtime_ms": 80.5, "bytes_transferred": 10_000,
                            "memory": MemoryFigures(qemu_downtime_ms=50)}
    base.update(kw)
    return MigrationReport(**base).model_dump(mode="json")


def test_measured_figures_live() -> None:
    assert measured_figures(report("live")) == Figures(total_time_s=12.5, downtime_ms=80.5,
                                                       wire_bytes=10_000)
    # no probe: QEMU's downtime
    assert measured_figures(report("live", observed_downtime_ms=None)) == Figures(
        total_time_s=12.5, downtime_ms=50, wire_bytes=10_000)


def test_measured_figures_leave_out_the_checks_after_the_switchover() -> None:
    got = measured_figures(report("live", checks_s=4.5))
    assert got is not None and got.total_time_s == 8.0


@pytest.mark.parametrize("mode", ["online", "cold", "warm"])
def test_measured_figures_read_one_total_whatever_the_mode(mode: str) -> None:
    # version 2: bytes_transferred holds the memory stream and every disk already
    disks = [DiskFigures(source="a", format="raw", virtual_size=1, source_allocated=1,
                         target="b", target_format="raw", data_bytes=20_000,
                         wire_bytes=9_000)]
    assert measured_figures(report(mode, disks=disks, memory=None)) == Figures(
        total_time_s=12.5, downtime_ms=80.5, wire_bytes=10_000)


def test_measured_figures_of_version_1_reports_after_loading() -> None:
    v1 = {"v": 1, "job": "j1", "vm": "vm1", "mode": "online", "source": "s", "dest": "d",
          "status": "completed", "total_time_s": 12.5, "qemu_downtime_ms": 50,
          "observed_downtime_ms": None, "bytes_transferred": 10_000,
          "disks": [{"source": "a", "target": "b", "bytes": 512 << 20,
                     "wire_bytes": 128 << 20}, {"bytes": 2_000}]}
    got = measured_figures(load_report(v1).model_dump(mode="json"))
    # the mirrors join the memory stream; the disk's own wire estimate wins when given
    assert got == Figures(total_time_s=12.5, downtime_ms=50,
                          wire_bytes=10_000 + (128 << 20) + 2_000)


@pytest.mark.parametrize("change", [
    {"status": "failed"}, {"status": "cancelled"}, {"status": "needs-operator"},
    {"total_time_s": None}, {"bytes_transferred": None},
    {"observed_downtime_ms": None, "memory": None}, {"mode": "teleport"},
])
def test_measured_figures_missing(change: dict[str, Any]) -> None:
    assert measured_figures(report("live", **change)) is None


def test_history_from_a_prediction_and_a_report() -> None:
    """The loop the service closes: raw prediction + measured report -> calibration."""
    a = shared(dirty=0.0)
    pred = raw(run(a)["live"])
    got = measured_figures(report("live", total_time_s=pred.total_time_s * 2,
                                  observed_downtime_ms=pred.downtime_ms,
                                  bytes_transferred=pred.wire_bytes))
    assert got is not None
    one = HistoryEntry(mode="live", vm="vm1", at=0, raw=pred, measured=got)
    # one migration is not enough to move the model
    assert run(a, calibration=calibrate([one]))["live"].figures == pred
    two = [one, one.model_copy(update={"at": 1})]
    again = run(a, calibration=calibrate(two))["live"]
    assert again.figures is not None
    assert again.figures.total_time_s == pytest.approx(got.total_time_s)


# -- the simulation --------------------------------------------------------------------------


def _simulate(sparse: bool, policy: Policy, **kw: Any) -> Any:
    opts = MigrationOptions(policy=policy)
    setup = plan_setup(opts)
    ctl = ConvergenceController(opts, setup)
    mig = SimulatedMigration.from_setup(setup, fast=True, **kw)
    if sparse:
        return drive_sparse(ctl, mig, timeout_s=policy.timeout_s, limit_s=900)
    return drive(ctl, mig, limit_s=900)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(policy=st.sampled_from([*BUILTIN, "never", "give-up"]),
       dirty=st.floats(0, 250 * MiB), wss=st.none() | st.integers(MiB, GiB),
       link=st.floats(20 * MiB, 500 * MiB))
def test_sparse_sampling_changes_nothing(policy: str, dirty: float, wss: int | None,
                                         link: float) -> None:
    pol = {"never": Policy(name="never", timeout_s=40),
           "give-up": Policy(name="give-up", steps=(Step(after_stalls=3, action="abort"),))
           }.get(policy) or BUILTIN[policy]
    kw = {"ram": GiB, "link_rate": link, "dirty_rate": dirty, "wss": wss}
    every, sparse = _simulate(False, pol, **kw), _simulate(True, pol, **kw)
    assert len(sparse.samples) <= len(every.samples)
    # the controller saw the same thing at the same times
    for name in ("status", "iterations", "actions", "history", "max_throttle"):
        assert getattr(sparse, name) == getattr(every, name), name
    # the physics took other strides through the same straight lines: float rounding
    for name in ("ended_at", "downtime_ms", "transferred", "postcopy_at", "paused_at"):
        want = getattr(every, name)
        assert getattr(sparse, name) == (None if want is None else pytest.approx(want, rel=1e-9))


def test_fast_simulation_matches_ticking() -> None:
    # no knife edges (the link is not a round number): the same run, up to float rounding
    for dirty in (0.0, 30 * MiB):
        runs = []
        for fast in (False, True):
            opts = MigrationOptions(policy=BUILTIN["balanced"])
            setup = plan_setup(opts)
            mig = SimulatedMigration.from_setup(setup, ram=GiB, link_rate=93.7 * MiB,
                                                dirty_rate=dirty, fast=fast)
            runs.append(drive(ConvergenceController(opts, setup), mig))
        ticking, fast_run = runs
        assert ticking.status == fast_run.status == "completed"
        assert ticking.iterations == fast_run.iterations
        assert fast_run.ended_at == pytest.approx(ticking.ended_at, abs=1e-6)
        assert fast_run.downtime_ms == pytest.approx(ticking.downtime_ms, abs=1e-3)


def test_live_first_pass_follows_the_sampled_nonzero_share() -> None:
    a = shared(dirty=0.0).model_copy(update={"nonzero_fraction": 0.25})
    quarter = run(a)["live"]
    assert raw(quarter).wire_bytes == GiB // 4
    assert any("25%" in n for n in quarter.notes)
    # a bounded writable set is never zero, whatever the sample says
    b = a.model_copy(update={"nonzero_fraction": 0.0, "dirty_set_bytes": 128 * MiB})
    assert raw(run(b)["live"]).wire_bytes >= 128 * MiB
