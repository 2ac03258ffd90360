"""What one VM's move costs at a given bandwidth: the seam the fleet scheduler plans
through, and the estimator built on the per-VM models (pure).

An :class:`Estimator` answers two questions about a VM:

``estimate(vm, bandwidth)``
    the :class:`Estimate` of its move at a constant ``bandwidth`` (bytes/s): time,
    downtime, bytes on the wire, and whether it converges at all. One that does not
    converge still says how long it would run before its policy gives up (``time_s``,
    finite): a migration starved of bandwidth occupies its share until then.
``min_bandwidth(vm)``
    the least bandwidth at which the move converges within its limits by itself (0 when
    any bandwidth will do: cold, warm, an idle guest). The scheduler does not start a
    move with less; a move whose ``min_bandwidth`` is more than its path's links allow
    is started on a lane of its own, where its estimate decides (post-copy, or refused).

The scheduler assumes, and any estimator should hold, that ``estimate(vm, b).converges``
for every ``b >= min_bandwidth(vm)``, and that ``time_s`` does not grow with ``b``.

:class:`ModelEstimator` builds on the models the single migrations use
(:mod:`vmigrate.plan.adaptive`, priors of :mod:`vmigrate.plan.predict`):

live
    the adaptive planner's :func:`~vmigrate.plan.adaptive.choose` from the start
    (``memory x first_pass_fraction`` to send, the guest's dirty rate and working set,
    ``bandwidth`` as the stream's rate: the fleet paces each stream at its allocation),
    among plain pre-copy at the downtime limits and, when the VM and its tier allow it,
    post-copy: a guest whose dirty rate cannot be beaten at ``bandwidth`` goes post-copy
    or does not converge. CPU throttling and pausing the guest are not counted on (a
    wave should not slow the guests it moves). Time = ``setup_s`` + the simulated run.
online
    the disks are mirrored first (``disk_bytes / bandwidth``, after ``mirror_setup_s``;
    a :class:`~vmigrate.plan.fleet.model.Vm` carries no disk write rate, so the mirror
    does not resend), then the memory as live; ``handover_ms`` on the downtime.
cold
    memory does not cross the link: ``disk_bytes`` (plus the stream's framing) at
    ``bandwidth``, between the guest's shutdown and its boot; downtime is all of that.
warm
    the base copy of ``disk_bytes`` while the guest runs, then a cutover of shutdown,
    one more copy setup and boot (no disk write rate: the last delta is taken as 0).

``min_bandwidth`` of a live or online VM is the least bandwidth at which a plain
pre-copy converges within the limits (the downtime limit: the VM's tier's, else the
estimator's; the time budget), found by bisection to ``precision`` and rounded up.
Post-copy is not counted there: it is the fallback on a lane of its own, not the plan.
Estimates are cached per VM and bandwidth, the bandwidth rounded *up* to a grid of
:data:`GRID` steps (a schedule's shares vary continuously; one simulation per step
keeps a wave's planning in seconds): a figure is at most that much optimistic, and
a bandwidth at or above ``min_bandwidth`` still converges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from vmigrate.plan.adaptive import Limits, Situation, candidates, choose
from vmigrate.plan.decide import Tier
from vmigrate.plan.fleet.model import FleetError, Vm, fmt_rate, fmt_size
from vmigrate.plan.predict import DEFAULT_PRIORS, Priors

__all__ = ["GRID", "Estimate", "Estimator", "ModelEstimator", "on_grid"]

#: the downtime limit a live move is planned at when its tier sets none (ms): the
#: adaptive policy's
DEFAULT_DOWNTIME_MS = 300.0
#: the most bandwidth :meth:`ModelEstimator.min_bandwidth` looks at (bytes/s, 100 Tbit/s)
_MAX_SEARCH = 1.25e13
#: estimates are made at bandwidths on a geometric grid of this ratio (rounded up)
GRID = 1.01


def on_grid(b: float) -> float:
    """``b`` rounded up to the estimate grid (0 and below stay as they are)."""
    if not (b > 0 and math.isfinite(b)):
        return b
    step = math.log(GRID)
    up = math.exp(math.ceil(math.log(b) / step - 1e-9) * step)
    return max(up, b)


@dataclass(frozen=True)
class Estimate:
    """One move at a constant bandwidth."""

    #: from the start of the move to the guest running on the destination (or, when it
    #: does not converge, until its policy gives up)
    time_s: float
    #: how long the guest is stopped (0 when it does not converge)
    downtime_ms: float
    #: what crosses the link
    bytes: float
    converges: bool
    #: it finishes by post-copy
    postcopy: bool = False
    #: how it goes, in a few words (for the schedule's explanations)
    note: str = ""


class Estimator(Protocol):
    """The seam the fleet plans through (see the module doc)."""

    def estimate(self, vm: Vm, bandwidth: float) -> Estimate:
        """The move of ``vm`` at a constant ``bandwidth`` (bytes/s)."""
        ...

    def min_bandwidth(self, vm: Vm) -> float:
        """The least bandwidth at which the move of ``vm`` converges (0: any)."""
        ...


class ModelEstimator:
    """An :class:`Estimator` on the single-migration models (see the module doc)."""

    def __init__(self, *, downtime_ms: float = DEFAULT_DOWNTIME_MS, budget_s: float = 600.0,
                 tiers: Mapping[str, Tier] | None = None, priors: Priors = DEFAULT_PRIORS,
                 precision: float = 0.02) -> None:
        """``downtime_ms``: the limit of a VM whose tier sets none; ``budget_s``: how
        long a memory migration may take before its policy gives up; ``tiers``: the
        tiers VMs name (an unknown name is a :class:`FleetError` when estimated)."""
        if not (downtime_ms > 0 and math.isfinite(downtime_ms)):
            raise FleetError(f"downtime_ms must be above 0, not {downtime_ms}")
        if not (budget_s > 0 and math.isfinite(budget_s)):
            raise FleetError(f"budget_s must be above 0, not {budget_s}")
        if not (0 < precision < 1):
            raise FleetError(f"precision must be between 0 and 1, not {precision}")
        self.downtime_ms = downtime_ms
        self.budget_s = budget_s
        self.tiers = dict(tiers or {})
        self.priors = priors
        self.precision = precision
        self._estimates: dict[tuple[Vm, float], Estimate] = {}
        self._floors: dict[Vm, float] = {}

    # -- the limits a VM's move runs within

    def limits(self, vm: Vm, *, postcopy: bool = True) -> Limits:
        """The limits of ``vm``'s memory migration (``postcopy=False``: never post-copy)."""
        limit, allowed = self.downtime_ms, vm.postcopy and postcopy
        if vm.tier is not None:
            tier = self.tiers.get(vm.tier)
            if tier is None:
                raise FleetError(f"VM {vm.name}: tier {vm.tier!r} is not known "
                                 f"(tiers: {', '.join(sorted(self.tiers)) or 'none'})")
            if tier.max_downtime_ms is not None:
                limit = min(limit, tier.max_downtime_ms)
            allowed = allowed and tier.postcopy
        p = self.priors
        # the fleet paces every stream at its allocation: no backlog at the switch
        return Limits(downtime_ms=limit, postcopy=allowed, budget_s=self.budget_s,
                      switchover_ms=p.switchover_ms, postcopy_switch_ms=p.postcopy_switch_ms,
                      backlog_ms=0.0)

    def _memory(self, vm: Vm, bandwidth: float, limits: Limits) -> tuple[float, float, float,
                                                                         bool, str] | None:
        """(time, downtime, bytes, post-copy, how) of the memory migration, None when it
        does not finish within ``limits``."""
        sit = Situation(remaining=max(1.0, vm.memory * self.priors.first_pass_fraction),
                        dirty_rate=vm.dirty_rate, wss=vm.working_set, bandwidth=bandwidth)
        paths = [p for p in candidates(sit, limits) if p.kind in ("precopy", "postcopy")]
        choice = choose(sit, limits, paths)
        o = choice.chosen
        if o is None:
            return None
        return o.time_s, o.downtime_ms, o.wire, o.postcopy, o.describe()

    # -- the seam

    def estimate(self, vm: Vm, bandwidth: float) -> Estimate:
        b = on_grid(bandwidth)
        found = self._estimates.get((vm, b))
        if found is None:
            found = self._estimates[(vm, b)] = self._estimate(vm, b)
        return found

    def _estimate(self, vm: Vm, b: float) -> Estimate:
        p = self.priors
        if not b > 0:
            return Estimate(time_s=self.budget_s, downtime_ms=0.0, bytes=0.0, converges=False,
                            note="no bandwidth")
        disk = vm.disk_bytes * (1 + p.stream_overhead)
        if vm.mode == "cold":
            copy_s = disk / b
            down = p.shutdown_s + p.copy_setup_s + copy_s + p.boot_s
            return Estimate(time_s=p.setup_s + down, downtime_ms=down * 1000, bytes=disk,
                            converges=True, note=f"cold: {fmt_size(disk)} of disk at "
                            f"{fmt_rate(b)} in {copy_s:.0f} s while the guest is off")
        if vm.mode == "warm":
            base_s = p.copy_setup_s + disk / b
            down = p.shutdown_s + p.copy_setup_s + p.boot_s
            return Estimate(time_s=p.setup_s + base_s + down, downtime_ms=down * 1000,
                            bytes=disk, converges=True,
                            note=f"warm: base copy of {fmt_size(disk)} in {base_s:.0f} s, "
                            f"cutover {down:.0f} s")
        before = p.setup_s
        extra_ms, extra_bytes, how = 0.0, 0.0, ""
        if vm.mode == "online":
            mirror_s = vm.disk_bytes / b
            before += p.mirror_setup_s + mirror_s
            extra_ms, extra_bytes = p.handover_ms, float(vm.disk_bytes)
            how = f"mirror {fmt_size(vm.disk_bytes)} in {mirror_s:.0f} s, then "
        memory = self._memory(vm, b, self.limits(vm))
        if memory is None:
            return Estimate(time_s=before + self.budget_s, downtime_ms=0.0,
                            bytes=extra_bytes + b * self.budget_s, converges=False,
                            note=f"{how}the guest dirties {fmt_rate(vm.dirty_rate)}: at "
                            f"{fmt_rate(b)} nothing finishes within the limits")
        time_s, downtime, wire, postcopy, what = memory
        return Estimate(time_s=before + time_s, downtime_ms=downtime + extra_ms,
                        bytes=wire + extra_bytes, converges=True, postcopy=postcopy,
                        note=how + what)

    def min_bandwidth(self, vm: Vm) -> float:
        found = self._floors.get(vm)
        if found is None:
            found = self._floors[vm] = self._min_bandwidth(vm)
        return found

    def _min_bandwidth(self, vm: Vm) -> float:
        if vm.mode in ("cold", "warm"):
            return 0.0
        limits = self.limits(vm, postcopy=False)

        def converges(b: float) -> bool:
            return self._memory(vm, b, limits) is not None

        # nothing finishes within the budget below what sends memory once in that time
        low = vm.memory * self.priors.first_pass_fraction / self.budget_s
        high = max(2 * low, 2 * vm.dirty_rate, 1e6)
        while not converges(high):
            low, high = high, high * 2
            if high > _MAX_SEARCH:
                return math.inf
        while high > low * (1 + self.precision):
            mid = math.sqrt(low * high)
            if converges(mid):
                high = mid
            else:
                low = mid
        return high
