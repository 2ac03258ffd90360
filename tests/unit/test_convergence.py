"""The convergence controller: samples, steps, timeouts, and against a fake migration."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmigrate.errors import QmpError
from vmigrate.plan.capabilities import (
    MigrationOptions,
    MigrationSetup,
    plan_setup,
    throttle_parameters,
)
from vmigrate.plan.convergence import (
    Abort,
    Action,
    ConvergenceController,
    PauseGuest,
    Sample,
    SetParameters,
    StartPostcopy,
)
from vmigrate.plan.policy import BUILTIN, Policy, Step
from vmigrate.testing.fakemigration import FakeMigration, drive

MiB = 1 << 20
GiB = 1 << 30


def sample(t: float, iteration: int, remaining: int, status: str = "active",
           total: int = GiB) -> Sample:
    return Sample(t=t, status=status, transferred=0, remaining=remaining, total=total,
                  iteration=iteration, dirty_rate=0.0)


def controller(policy: Policy | str, **opts: Any) -> tuple[ConvergenceController, MigrationSetup]:
    pol = BUILTIN[policy] if isinstance(policy, str) else policy
    options = MigrationOptions(policy=pol, **opts)
    setup = plan_setup(options)
    return ConvergenceController(options, setup), setup


def feed(ctl: ConvergenceController, samples: list[Sample]) -> list[tuple[int, Action]]:
    """Observe every sample; (iteration, action) for each action returned."""
    out: list[tuple[int, Action]] = []
    for s in samples:
        out += [(s.iteration, a) for a in ctl.observe(s)]
    return out


def flat(iterations: int, remaining: int = 300 * MiB, per_iteration: int = 3) -> list[Sample]:
    """A non-converging run: bulk pass, then every pass ends with the same remaining."""
    samples = [sample(0.0, 1, GiB)]
    t = 0.0
    for it in range(2, iterations + 1):
        for k in range(per_iteration):
            t += 0.5
            samples.append(sample(t, it, remaining - k * 10 * MiB))
    return samples


# -- samples ------------------------------------------------------------------------------------


def test_sample_from_query_migrate() -> None:
    reply = {
        "status": "active", "expected-downtime": 120, "cpu-throttle-percentage": 30,
        "ram": {"transferred": 10, "remaining": 20, "total": 30, "dirty-sync-count": 4,
                "dirty-pages-rate": 100, "page-size": 4096, "mbps": 800.5,
                "postcopy-requests": 0},
    }
    s = Sample.from_query_migrate(1.5, reply)
    assert (s.t, s.status, s.transferred, s.remaining, s.total, s.iteration) == (
        1.5, "active", 10, 20, 30, 4)
    assert s.dirty_rate == 100 and s.throttle_pct == 30 and s.mbps == 800.5
    assert s.expected_downtime_ms == 120 and s.dirty_bytes_rate == 409600
    assert Sample.from_query_migrate(1.5, {"return": reply}) == s


def test_sample_tolerates_missing_fields() -> None:
    s = Sample.from_query_migrate(0.0, {"status": "setup"})
    assert (s.status, s.remaining, s.iteration, s.page_size) == ("setup", 0, 0, 4096)
    assert Sample.from_query_migrate(0.0, {}).status == "none"
    odd = Sample.from_query_migrate(0.0, {"status": 3, "ram": {"remaining": "x", "total": None,
                                                              "dirty-sync-count": True}})
    assert (odd.status, odd.remaining, odd.total, odd.iteration) == ("none", 0, 0, 0)
    done = Sample.from_query_migrate(9.0, {"status": "completed", "downtime": 42, "ram": []})
    assert done.downtime_ms == 42 and done.total == 0


# -- the controller on synthetic samples --------------------------------------------------------


def test_converging_takes_no_steps() -> None:
    ctl, _ = controller("balanced")
    samples = [sample(0.0, 1, GiB)]
    remaining = GiB
    for it in range(2, 12):
        remaining //= 2
        samples += [sample(it * 1.0, it, remaining), sample(it * 1.0 + 0.5, it, remaining // 2)]
    samples.append(sample(20.0, 12, 0, status="completed"))
    assert feed(ctl, samples) == []
    assert ctl.stalls == 0 and ctl.history == []


def test_flat_fires_steps_in_order() -> None:
    ctl, setup = controller("balanced")
    assert ctl.initial_parameters() == setup.parameters
    fired = feed(ctl, flat(12))
    # iteration 2 ends the bulk pass (not a stall); 3 stalls -> step 1; 4, 5 -> step 2 ...
    assert [it for it, _ in fired] == [3, 5, 7, 9]
    (_, a1), (_, a2), (_, a3), (_, a4) = fired
    assert isinstance(a1, SetParameters) and a1.params == {"downtime-limit": 300}
    assert isinstance(a2, SetParameters) and a2.params == {"downtime-limit": 600}
    assert isinstance(a3, SetParameters) and a3.params == throttle_parameters(20)
    assert a3.params["cpu-throttle-increment"] == 10
    assert isinstance(a4, StartPostcopy)
    assert [(r.action, r.iteration, r.step, r.taken) for r in ctl.history] == [
        ("downtime", 3, 0, True), ("downtime", 5, 1, True), ("throttle", 7, 2, True),
        ("postcopy", 9, 3, True)]
    assert ctl.stalls == 10



def test_postcopy_step_skipped_when_not_enabled() -> None:
    policy = Policy(name="p", steps=(Step(after_stalls=1, action="postcopy"),
                                     Step(after_stalls=1, action="pause")))
    options = MigrationOptions(policy)
    setup = dataclasses.replace(plan_setup(options), postcopy=False)
    ctl = ConvergenceController(options, setup)
    fired = feed(ctl, flat(6))
    assert [(it, type(a)) for it, a in fired] == [(4, PauseGuest)]
    skipped, paused = ctl.history
    assert (skipped.action, skipped.taken, skipped.iteration) == ("postcopy", False, 3)
    assert (paused.action, paused.taken) == ("pause", True)


def test_throttle_step_skipped_without_auto_converge() -> None:
    policy = Policy(name="p", steps=(Step(after_stalls=1, action="throttle", value=40),))
    options = MigrationOptions(policy)
    setup = plan_setup(options)
    setup = dataclasses.replace(setup, capabilities={**setup.capabilities,
                                                     "auto-converge": False})
    ctl = ConvergenceController(options, setup)
    assert feed(ctl, flat(6)) == []
    assert [(r.action, r.taken) for r in ctl.history] == [("throttle", False)]


def test_downtime_step_not_lowering_override() -> None:
    ctl, _ = controller("balanced", downtime_ms=1000)
    fired = feed(ctl, flat(10))
    assert [(it, type(a)) for it, a in fired] == [(7, SetParameters), (9, StartPostcopy)]
    assert [(r.action, r.taken) for r in ctl.history] == [
        ("downtime", False), ("downtime", False), ("throttle", True), ("postcopy", True)]


def test_one_shot_actions_not_repeated() -> None:
    policy = Policy(name="p", steps=(Step(after_stalls=1, action="pause"),
                                     Step(after_stalls=1, action="pause")))
    ctl, _ = controller(policy)
    fired = feed(ctl, flat(8))
    assert [type(a) for _, a in fired] == [PauseGuest]
    assert [r.taken for r in ctl.history] == [True, False]


def test_stall_ratio_zero_counts_every_iteration() -> None:
    ctl, _ = controller("postcopy")
    samples = [sample(0.0, 1, GiB), sample(5.0, 1, GiB // 2), sample(10.0, 2, 100 * MiB)]
    fired = feed(ctl, samples)
    assert [(it, type(a)) for it, a in fired] == [(2, StartPostcopy)]


def test_terminal_status_ends_everything() -> None:
    ctl, _ = controller(Policy(name="p", timeout_s=1))
    for status in ("completed", "failed", "cancelled"):
        assert ctl.observe(sample(100.0, 5, 0, status=status)) == []


def test_timeout_abort() -> None:
    ctl, _ = controller(Policy(name="p", timeout_s=10, timeout_action="abort"))
    samples = [sample(t * 0.5, 1, GiB - int(t) * MiB) for t in range(30)]
    fired = feed(ctl, samples)
    assert [type(a) for _, a in fired] == [Abort]
    assert ctl.history[-1].action == "timeout" and ctl.history[-1].step is None
    assert ctl.observe(sample(20.0, 2, GiB)) == []


def test_timeout_complete_by_postcopy_or_pause() -> None:
    with_postcopy = Policy(name="p", timeout_s=5, timeout_action="complete",
                           steps=(Step(after_stalls=50, action="postcopy"),))
    ctl, _ = controller(with_postcopy)
    assert [type(a) for _, a in feed(ctl, flat(10))] == [StartPostcopy]
    without = Policy(name="q", timeout_s=5, timeout_action="complete")
    ctl, _ = controller(without)
    assert [type(a) for _, a in feed(ctl, flat(10))] == [PauseGuest]


def test_timeout_complete_after_pause_waits() -> None:
    policy = Policy(name="p", timeout_s=5, timeout_action="complete",
                    steps=(Step(after_stalls=1, action="pause"),))
    ctl, _ = controller(policy)
    assert [type(a) for _, a in feed(ctl, flat(20))] == [PauseGuest]
    assert ctl.history[-1].action == "timeout" and not ctl.history[-1].taken


def test_timeout_in_postcopy_never_aborts() -> None:
    ctl, _ = controller(Policy(name="p", timeout_s=5, timeout_action="abort"))
    assert ctl.observe(sample(6.0, 3, GiB, status="postcopy-active")) == []
    assert ctl.observe(sample(7.0, 3, GiB, status="active")) == []


def test_timeout_deferred_during_switchover() -> None:
    ctl, _ = controller(Policy(name="p", timeout_s=5, timeout_action="abort"))
    assert ctl.observe(sample(6.0, 3, 0, status="device")) == []
    assert [type(a) for a in ctl.observe(sample(6.5, 3, GiB, status="active"))] == [Abort]


# -- property -----------------------------------------------------------------------------------

_step = st.one_of(
    st.builds(Step, after_stalls=st.integers(1, 3), action=st.just("downtime"),
              value=st.integers(0, 5000)),
    st.builds(Step, after_stalls=st.integers(1, 3), action=st.just("throttle"),
              value=st.integers(1, 99)),
    st.builds(Step, after_stalls=st.integers(1, 3),
              action=st.sampled_from(["postcopy", "pause"])),
)


@st.composite
def _policies(draw: st.DrawFn) -> Policy:
    steps = draw(st.lists(_step, max_size=6))
    if draw(st.booleans()):
        steps.append(Step(after_stalls=draw(st.integers(1, 3)), action="abort"))
    return Policy(
        name="h", steps=tuple(steps), timeout_s=draw(st.floats(1, 60)),
        timeout_action=draw(st.sampled_from(["abort", "complete"])),
        stall_ratio=draw(st.sampled_from([0.0, 0.5, 0.95, 1.0, 2.0])),
    )


_readings = st.lists(
    st.tuples(st.floats(0.1, 3.0), st.integers(0, 2), st.integers(0, GiB),
              st.sampled_from(["active"] * 8 + ["setup", "device", "postcopy-active"])),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(policy=_policies(), readings=_readings)
def test_controller_bounded_and_ordered(policy: Policy, readings: list[
        tuple[float, int, int, str]]) -> None:
    ctl, _ = controller(policy)
    t, iteration = 0.0, 1
    actions: list[Action] = []
    for dt, step, remaining, status in readings:
        t += dt
        iteration += step
        new = ctl.observe(sample(t, iteration, remaining, status=status))
        if any(isinstance(a, Abort) for a in actions):
            assert new == []
        actions += new
    assert len(actions) <= len(policy.steps) + 1
    for kind in (StartPostcopy, PauseGuest, Abort):
        assert sum(isinstance(a, kind) for a in actions) <= 1
    indices = [r.step for r in ctl.history if r.step is not None]
    assert indices == sorted(set(indices))
    assert indices == list(range(len(indices)))  # in order, none left out
    assert sum(r.action == "timeout" for r in ctl.history) <= 1
    assert len([r for r in ctl.history if r.taken]) == len(actions)


# -- against the fake migration -----------------------------------------------------------------


def run_fake(policy: str | Policy, *, ram: int = GiB, link: float = 100 * MiB,
             dirty: float = 0.0, wss: int | None = None, **opts: Any) -> Any:
    ctl, setup = controller(policy, **opts)
    mig = FakeMigration.from_setup(setup, ram=ram, link_rate=link, dirty_rate=dirty, wss=wss)
    return drive(ctl, mig)


def test_fake_idle_completes_without_steps() -> None:
    for name in BUILTIN:
        if name == "postcopy":
            continue  # moves after the first pass by design; an idle guest ends in that pass
        run = run_fake(name)
        assert run.status == "completed" and run.actions == [] and run.history == []


def test_fake_converging_completes_without_steps() -> None:
    run = run_fake("balanced", dirty=30 * MiB)
    assert run.status == "completed" and run.history == []
    assert run.downtime_ms is not None and run.downtime_ms < 400


def test_fake_balanced_completes_2x_dirty_via_postcopy() -> None:
    run = run_fake("balanced", dirty=200 * MiB, wss=256 * MiB)
    assert run.status == "completed"
    assert [r.action for r in run.history] == ["downtime", "downtime", "throttle", "postcopy"]
    assert all(r.taken for r in run.history)
    assert isinstance(run.actions[-1], StartPostcopy)
    assert run.max_throttle > 1  # the throttle step released the held auto-converge
    assert run.downtime_ms is not None and run.downtime_ms < 100


def test_fake_held_throttle_stays_at_one_percent() -> None:
    policy = Policy(name="held", steps=(Step(after_stalls=50, action="throttle", value=20),),
                    timeout_s=60)
    run = run_fake(policy, dirty=200 * MiB, wss=256 * MiB)
    assert run.status == "cancelled" and run.max_throttle == 1


def test_fake_suspend_pauses_with_long_downtime() -> None:
    run = run_fake("suspend", dirty=200 * MiB, wss=256 * MiB)
    assert run.status == "completed"
    assert [type(a) for a in run.actions] == [PauseGuest]
    assert run.downtime_ms is not None and run.downtime_ms > 1000


def test_fake_minimal_downtime_goes_postcopy() -> None:
    run = run_fake("minimal-downtime", dirty=200 * MiB, wss=256 * MiB)
    assert run.status == "completed" and [type(a) for a in run.actions] == [StartPostcopy]


def test_fake_multifd_with_suspend() -> None:
    run = run_fake("suspend", dirty=200 * MiB, wss=256 * MiB, parallel=4, compress="zstd")
    assert run.status == "completed" and [type(a) for a in run.actions] == [PauseGuest]


def test_fake_timeout_abort_cancels() -> None:
    policy = Policy(name="never", timeout_s=30, timeout_action="abort")
    run = run_fake(policy, dirty=200 * MiB, wss=256 * MiB)
    assert run.status == "cancelled" and 30 <= run.t < 31


def test_fake_rejects_what_qemu_rejects() -> None:
    mig = FakeMigration(ram=GiB, link_rate=100 * MiB)
    for bad in ({"cpu-throttle-increment": 0}, {"max-cpu-throttle": 0},
                {"throttle-trigger-threshold": 101}, {"downtime-limit": 2_000_001}):
        with pytest.raises(QmpError):
            mig.set_parameters(bad)
    with pytest.raises(QmpError):
        mig.start_postcopy()  # postcopy-ram not enabled
    broken = FakeMigration(ram=GiB, link_rate=MiB,
                           capabilities={"multifd": True, "postcopy-ram": True})
    broken.start_postcopy()
    assert broken.status == "failed"

