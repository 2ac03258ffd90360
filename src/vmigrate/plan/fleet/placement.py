"""Where VMs go: emptying a host, and rebalancing the active ones (pure).

Both take a :class:`~vmigrate.plan.fleet.model.Fleet` and an
:class:`~vmigrate.plan.fleet.estimate.Estimator` and return a :class:`Placement`: the
moves, the VMs that cannot be placed with the reason, and one sentence with figures
per VM. They decide *where*; :func:`~vmigrate.plan.fleet.schedule.schedule` decides
*when*.

Rules a destination follows (both functions)
--------------------------------------------
* it is ``active`` (a draining host or one in maintenance receives nothing);
* the VMs fit in its memory: ``memory - reserve_memory - used`` less what the plan
  already sends there;
* no VM with the same ``anti_affinity`` key is on it, now or by the plan;
* VMs sharing a ``group`` or an ``affinity`` key move as one unit, to one
  destination (the host of the unit's other VMs, when some stay), and a unit with
  more VMs than the destination's ``max_in`` or the source's ``max_out`` cannot go
  there (the scheduler starts a unit's moves together);
* the move converges on its lane (the lesser allowance of the source's uplink and the
  destination's downlink), by the estimator.

Evacuation takes the units of the host biggest first (memory, then name) and gives
each the destination with the most free memory *fraction* after it (ties by name),
so the VMs spread over the hosts instead of filling one.

Rebalancing measures the imbalance of the active hosts as the mean of two
coefficients of variation (population standard deviation over mean, 0 when the mean
is 0): of memory utilisation (``used / (memory - reserve_memory)``) and of CPU
utilisation (``used cpus / cpus``). Both count: a fleet balanced in memory but with
all the busy guests on one host is not balanced. It then moves, greedily, the unit
whose move lowers the imbalance most per predicted second (the estimate at its lane,
the members' times summed, at least 1 s), among the moves that lower it by at least
``min_gain`` (an absolute drop of the measure); at most ``max_moves`` VMs in all, each
unit moved once. Only units whose VMs all run on one active host move.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmigrate.plan.fleet.estimate import Estimator
from vmigrate.plan.fleet.model import Fleet, FleetError, Host, Move, Vm, fmt_rate, fmt_size
from vmigrate.plan.fleet.model import units as _units

__all__ = ["Placement", "imbalance", "plan_evacuation", "plan_rebalance"]


@dataclass(frozen=True)
class Placement:
    """Moves planned, the VMs left where they are and why, and why each choice."""

    moves: list[Move] = field(default_factory=list)
    #: (vm, reason) for every VM that could not be placed
    unplaceable: list[tuple[str, str]] = field(default_factory=list)
    #: vm -> a sentence with figures (moved or not)
    why: dict[str, str] = field(default_factory=dict)
    #: rebalancing: the imbalance measure before and after the moves
    imbalance_before: float | None = None
    imbalance_after: float | None = None
    #: the placement in one sentence
    summary: str = ""

    def to_json(self) -> dict[str, Any]:
        """The placement as plain data (``--json``)."""
        out: dict[str, Any] = {
            "moves": [{"vm": m.vm, "src": m.src, "dst": m.dst, "why": self.why.get(m.vm, "")}
                      for m in self.moves],
            "unplaceable": [{"vm": vm, "reason": reason} for vm, reason in self.unplaceable],
            "summary": self.summary,
        }
        if self.imbalance_before is not None:
            out["imbalance_before"] = round(self.imbalance_before, 4)
        if self.imbalance_after is not None:
            out["imbalance_after"] = round(self.imbalance_after, 4)
        return out


class _Plan:
    """Where every VM is by the plan so far, and what that uses on each host."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.where = {v.name: v.host for v in fleet.vms}
        self.memory = {h.name: 0 for h in fleet.hosts}
        self.cpus = {h.name: 0.0 for h in fleet.hosts}
        for v in fleet.vms:
            self.memory[v.host] += v.memory
            self.cpus[v.host] += v.cpus

    def free(self, host: Host) -> int:
        return host.capacity - self.memory[host.name]

    def move(self, unit: Sequence[Vm], dst: str) -> None:
        for v in unit:
            src = self.where[v.name]
            self.memory[src] -= v.memory
            self.cpus[src] -= v.cpus
            self.memory[dst] += v.memory
            self.cpus[dst] += v.cpus
            self.where[v.name] = dst

    def anti_on(self, key: str, host: str, unit: Sequence[Vm]) -> str | None:
        """A VM outside ``unit`` with anti-affinity ``key`` on ``host``, by the plan."""
        inside = {v.name for v in unit}
        for v in self.fleet.vms:
            if v.anti_affinity == key and v.name not in inside and self.where[v.name] == host:
                return v.name
        return None

    def refusal(self, unit: Sequence[Vm], src: str, dst: Host, estimator: Estimator
                ) -> str | None:
        """Why ``unit`` cannot go from ``src`` to ``dst`` (None: it can)."""
        if dst.name == src:
            return "it is the source"
        if dst.state != "active":
            return f"{dst.name} is {dst.state}"
        need = sum(v.memory for v in unit)
        free = self.free(dst)
        if need > free:
            return (f"{dst.name} has {fmt_size(max(free, 0))} free, "
                    f"{'they need' if len(unit) > 1 else 'it needs'} {fmt_size(need)}")
        for v in unit:
            if v.anti_affinity is not None:
                other = self.anti_on(v.anti_affinity, dst.name, unit)
                if other is not None:
                    return f"anti-affinity {v.anti_affinity!r}: {other} is on {dst.name}"
        if len(unit) > dst.max_in:
            return (f"{dst.name} takes at most {dst.max_in} migrations in at a time and the "
                    f"unit's {len(unit)} start together")
        source = self.fleet.host(src)
        if len(unit) > source.max_out:
            return (f"{src} sends at most {source.max_out} migrations at a time and the "
                    f"unit's {len(unit)} start together")
        lane = self.fleet.lane(src, dst.name)
        for v in unit:
            est = estimator.estimate(v, lane)
            if not est.converges:
                return (f"{v.name} does not converge on the {fmt_rate(lane)} lane to "
                        f"{dst.name}: {est.note or 'the estimate says so'}")
        return None


def _names(unit: Sequence[Vm]) -> str:
    return ", ".join(v.name for v in unit)


def _affinity_home(fleet: Fleet, plan: _Plan, unit: Sequence[Vm]) -> tuple[str | None, str]:
    """The host the unit's group or affinity ties it to (the VMs of its groups and
    affinity keys that do not move with it), and a reason when that cannot be met;
    (None, "") when free."""
    inside = {v.name for v in unit}
    groups = {v.group for v in unit if v.group is not None}
    keys = {v.affinity for v in unit if v.affinity is not None}
    homes = sorted({plan.where[v.name] for v in fleet.vms if v.name not in inside
                    and (v.affinity in keys or v.group in groups)})
    if not homes:
        return None, ""
    if len(homes) > 1:
        return None, f"its group or affinity ties it to VMs on {', '.join(homes)} at once"
    return homes[0], ""


def plan_evacuation(fleet: Fleet, host: str, estimator: Estimator,
                    only: Collection[str] | None = None) -> Placement:
    """Moves that empty ``host`` (see the module doc). A VM that fits nowhere is in
    ``unplaceable`` with every host's reason; the others' moves are planned anyway.
    ``only``: move just these of its VMs (with the rest of their group or affinity
    unit, which moves together), leaving the others where they are."""
    src = fleet.host(host)
    plan = _Plan(fleet)
    moves: list[Move] = []
    unplaceable: list[tuple[str, str]] = []
    why: dict[str, str] = {}
    todo = sorted((u for u in _units(fleet.vms_on(src.name))
                   if only is None or any(v.name in only for v in u)),
                  key=lambda u: (-sum(v.memory for v in u), u[0].name))
    others = [h for h in sorted(fleet.hosts, key=lambda h: h.name) if h.name != src.name]
    for unit in todo:
        need = sum(v.memory for v in unit)
        home, home_problem = _affinity_home(fleet, plan, unit)
        fits: list[tuple[float, str, int]] = []
        excluded: list[str] = []
        for h in others:
            reason = home_problem or (
                f"its group or affinity ties it to {home}" if home is not None and h.name != home
                else plan.refusal(unit, src.name, h, estimator))
            if reason is None:
                after = plan.free(h) - need
                fits.append((after / h.capacity, h.name, after))
            elif h.state == "active":
                excluded.append(f"{h.name}: {reason}")
        what = f"{_names(unit)} ({fmt_size(need)})"
        if not fits:
            reason = ("no other host is active" if not any(h.state == "active" for h in others)
                      else "no active host takes it: " + "; ".join(excluded))
            for v in unit:
                unplaceable.append((v.name, reason))
                why[v.name] = f"{what} stays on {src.name}: {reason}"
            continue
        fits.sort(key=lambda f: (-f[0], f[1]))
        share, dst, after = fits[0]
        dst_host = fleet.host(dst)
        lane = fleet.lane(src.name, dst)
        sentence = (f"{what} -> {dst}: {fmt_size(after)} of its {fmt_size(dst_host.capacity)} "
                    f"stay free after it ({share:.0%}), the most of the "
                    f"{len(fits)} host{'s' if len(fits) != 1 else ''} that take it")
        if len(fits) > 1:
            sentence += f" ({fits[1][1]} would keep {fits[1][0]:.0%})"
        est = [estimator.estimate(v, lane) for v in unit]
        sentence += (f"; lane {fmt_rate(lane)}, about {max(e.time_s for e in est):.0f} s "
                     "alone on it")
        if excluded:
            sentence += "; not " + "; ".join(excluded)
        plan.move(unit, dst)
        for v in unit:
            moves.append(Move(v.name, src.name, dst))
            why[v.name] = sentence
    dsts = len({m.dst for m in moves})
    summary = (f"{host}: {len(moves)} VM{'s' if len(moves) != 1 else ''} placed on {dsts} "
               f"host{'s' if dsts != 1 else ''}, {len(unplaceable)} unplaceable")
    return Placement(moves=moves, unplaceable=unplaceable, why=why, summary=summary)


@dataclass(frozen=True)
class _Balance:
    memory_cv: float
    cpu_cv: float

    @property
    def value(self) -> float:
        return (self.memory_cv + self.cpu_cv) / 2


def _cv(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return 0.0 if mean <= 0 else statistics.pstdev(values) / mean


def _balance(hosts: Sequence[Host], memory: Mapping[str, int], cpus: Mapping[str, float]
             ) -> _Balance:
    return _Balance(_cv([memory[h.name] / h.capacity for h in hosts]),
                    _cv([cpus[h.name] / h.cpus for h in hosts]))


def imbalance(fleet: Fleet) -> float:
    """The imbalance of the fleet's active hosts (see the module doc): 0 is balanced."""
    plan = _Plan(fleet)
    return _balance(fleet.active(), plan.memory, plan.cpus).value


def plan_rebalance(fleet: Fleet, estimator: Estimator, max_moves: int = 5,
                   min_gain: float = 0.01) -> Placement:
    """Greedy moves that lower the imbalance (see the module doc). Raises
    :class:`FleetError` for a negative ``max_moves`` or ``min_gain``."""
    if max_moves < 0:
        raise FleetError(f"max_moves must be 0 or more, not {max_moves}")
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise FleetError(f"min_gain must be 0 or more, not {min_gain}")
    hosts = fleet.active()
    plan = _Plan(fleet)
    start = _balance(hosts, plan.memory, plan.cpus)
    movable = [u for u in _units(fleet.vms)
               if len({v.host for v in u}) == 1 and fleet.host(u[0].host).state == "active"]
    moves: list[Move] = []
    why: dict[str, str] = {}
    moved: set[str] = set()
    now = start
    while len(moves) < max_moves:
        best: tuple[float, float, str, str, list[Vm], float, _Balance] | None = None
        for unit in movable:
            if unit[0].name in moved or len(moves) + len(unit) > max_moves:
                continue
            src = plan.where[unit[0].name]
            for dst in hosts:
                if dst.name == src or plan.refusal(unit, src, dst, estimator) is not None:
                    continue
                mem, cpu = dict(plan.memory), dict(plan.cpus)
                for v in unit:
                    mem[src] -= v.memory
                    mem[dst.name] += v.memory
                    cpu[src] -= v.cpus
                    cpu[dst.name] += v.cpus
                after = _balance(hosts, mem, cpu)
                gain = now.value - after.value
                if gain < min_gain or gain <= 0:
                    continue
                lane = fleet.lane(src, dst.name)
                cost = max(1.0, sum(estimator.estimate(v, lane).time_s for v in unit))
                score = gain / cost
                cand = (score, gain, unit[0].name, dst.name, unit, cost, after)
                if best is None or (score, gain) > (best[0], best[1]) or (
                        (score, gain) == (best[0], best[1])
                        and (unit[0].name, dst.name) < (best[2], best[3])):
                    best = cand
        if best is None:
            break
        _, gain, _, dst_name, unit, cost, after = best
        src = plan.where[unit[0].name]

        def util(h: str, mem: Mapping[str, int], cpu: Mapping[str, float]) -> str:
            host = fleet.host(h)
            return (f"memory {mem[h] / host.capacity:.0%}, CPU {cpu[h] / host.cpus:.0%}")

        before_mem, before_cpu = dict(plan.memory), dict(plan.cpus)
        plan.move(unit, dst_name)
        sentence = (f"{_names(unit)} ({fmt_size(sum(v.memory for v in unit))}, "
                    f"{sum(v.cpus for v in unit):g} CPUs) {src} -> {dst_name}: imbalance "
                    f"{now.value:.3f} -> {after.value:.3f} (gain {gain:.3f}, at least "
                    f"{min_gain:g} asked) for about {cost:.0f} s of migration; {src} "
                    f"{util(src, before_mem, before_cpu)} -> {util(src, plan.memory, plan.cpus)}"
                    f", {dst_name} {util(dst_name, before_mem, before_cpu)} -> "
                    f"{util(dst_name, plan.memory, plan.cpus)}")
        for v in unit:
            moves.append(Move(v.name, src, dst_name))
            why[v.name] = sentence
            moved.add(v.name)
        now = after
    summary = (f"imbalance {start.value:.3f} (memory CV {start.memory_cv:.3f}, CPU CV "
               f"{start.cpu_cv:.3f}) over {len(hosts)} active hosts")
    if moves:
        summary += (f" -> {now.value:.3f} (memory CV {now.memory_cv:.3f}, CPU CV "
                    f"{now.cpu_cv:.3f}) with {len(moves)} move{'s' if len(moves) != 1 else ''}")
    elif max_moves == 0:
        summary += ": max_moves is 0"
    else:
        summary += f": no move lowers it by {min_gain:g} or more"
    return Placement(moves=moves, unplaceable=[], why=why, imbalance_before=start.value,
                     imbalance_after=now.value, summary=summary)
