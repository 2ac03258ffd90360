"""When each move of a wave runs, and at what bandwidth: the fleet scheduler (pure).

:func:`schedule` runs a fluid simulation of the wave, event by event (the wave's start
and each migration's end). A migration from host ``a`` to ``b`` crosses two links:
``a``'s uplink and ``b``'s downlink. Its progress follows the estimator: at a rate
``r`` it would take ``T(r)`` in all (``estimate(vm, r).time_s``), so it does
``1 / T(r)`` of itself per second at that rate, and when the rate changes what is left
goes at the new one. A rate at which its estimate does not converge makes no headway
(the guest dirties what the link carries); a migration that makes no headway for as
long as its estimate's ``time_s`` there (its policy's budget) is cancelled: failed, the
VM stays on its source.

The product: strategy ``"vmigrate"``
-------------------------------------
Admission, at every event, in priority order, in two passes: first the units that
add throughput (each of their links has room left once the running migrations have
their shares: a free lane beside a full one), then any the rules let start (they
share a full link). A host's ``max_out`` slots are scarce: two moves that share one
full link do not take both while a third could use an idle one. The rules:

* every move gets a *floor*: the least bandwidth it is started with, ``need =
  max(min_bandwidth(vm), min_share x lane)`` capped at its ``lane`` (the lesser of its
  two links' allowances). ``min_share`` (default :data:`MIN_SHARE`, a quarter) keeps at
  most four moves on a link, each fast enough for short passes and a short
  switchover; ``min_bandwidth`` makes a hot guest wait until its links have room for
  it rather than start in a fair share it cannot converge in;
* it starts only if the floors of the migrations on each of its links, its own
  included, stay within the link's allowance; its source sends fewer than
  ``max_out`` and its destination receives fewer than ``max_in``; its memory fits on
  the destination counting the memory reserved there by migrations in flight (a
  migration holds its memory on both hosts until it ends); and no VM with its
  anti-affinity key is on the destination or in flight to or from it;
* VMs sharing a ``group`` or an ``affinity`` key are one unit: they start together, to
  one destination, or not at all;
* a unit that cannot start *holds* what it waits for (the link, the destination's
  memory or slots, the source's slots) from the time the migrations running now
  should have freed enough of it, by their current rates: units after it take that
  resource only if they are done by then, at their floors (EASY backfilling), so a
  big or hot VM is not overtaken forever by small ones while the small ones still
  fill the gaps. If nothing runs and nothing can start with holds, the holds are
  dropped; if still nothing can start, what is left is refused with the reason.

Moves that cannot converge even alone on their lane, whose destination is not
active, whose unit is larger than a host's ``max_in``/``max_out`` or needs more than a
link allows, that do not fit beside the VMs staying on the destination, that would
join a VM of their anti-affinity key staying there, whose unit holds two VMs of one
anti-affinity key on different hosts, or whose move would split a group or an
affinity key that is together now are refused before the wave starts
(:attr:`Schedule.refused`).

Allocation: each running migration gets its floor, and what the links have left is
shared out max-min fairly (progressive filling: all rise together until a link is
full, those on it stop, the rest go on), within the allowances. It is done again at
every event, so bandwidth freed by a migration that ends goes to the ones running.

Order (the priority): *bottleneck first, hot first, longest first*. Each link's load
is the seconds its moves would keep it full, each alone at its lane; a unit's
bottleneck is its busiest link. Units on the busiest bottleneck go first (they decide
the makespan; units on other links run beside them anyway), among them the hot ones
(whose floor is above ``min_share``: their lane is easiest to find while the links
are empty, and a full lane gives them the shortest downtime), then the longest
(longest-processing-time first: the short ones fill in at the end), then by name.

Finally, the same rules are run one unit at a time; if the model says that is quicker
(sharing a link costs a dirtying guest more resent pages than it saves) that plan is
returned, so the product is never slower than one at a time by its own figures.

Baselines (same moves, same estimator; they may break the budgets, that is the point)
-------------------------------------------------------------------------------------
``sequential``
    one migration at a time in the order given, with the whole of its lane (the
    allowance: an operator doing them by hand within the budget).
``all-at-once``
    everything starts at once; fair share of the links' full capacity; no checks.
``kubevirt``
    at most :data:`KUBEVIRT_PER_CLUSTER` in flight in the cluster and
    :data:`KUBEVIRT_PER_NODE` out of a node, in a random order (``seed``); no bandwidth
    limit: a fair share of the links' capacity; no checks of the destination.
``proxmox``
    :data:`PROXMOX_WORKERS` workers, VMs by name (``migrateall`` to one target node);
    a fair share of the links' capacity; no checks.

Baselines move every VM on its own (groups are not kept together) and check no host
capacity, anti-affinity or budget; :func:`~vmigrate.plan.fleet.check.check_schedule`
says what they break.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from vmigrate.plan.fleet.estimate import Estimate, Estimator
from vmigrate.plan.fleet.model import Fleet, FleetError, Move, Vm, fmt_rate, fmt_size
from vmigrate.plan.fleet.model import units as _units

__all__ = [
    "KUBEVIRT_PER_CLUSTER",
    "KUBEVIRT_PER_NODE",
    "MIN_SHARE",
    "PROXMOX_WORKERS",
    "STRATEGIES",
    "Entry",
    "Schedule",
    "Strategy",
    "schedule",
]

Strategy = Literal["vmigrate", "sequential", "all-at-once", "kubevirt", "proxmox"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

#: the least share of its lane a migration is started with (see the module doc)
MIN_SHARE = 0.25
#: KubeVirt's defaults: parallelMigrationsPerCluster, parallelOutboundMigrationsPerNode
KUBEVIRT_PER_CLUSTER = 5
KUBEVIRT_PER_NODE = 2
#: Proxmox ``migrateall`` default ``maxworkers``
PROXMOX_WORKERS = 2
#: how long a migration that makes no headway runs when its estimate gives no time
_GIVE_UP_S = 3600.0
_EPS = 1e-9


@dataclass(frozen=True)
class Entry:
    """One move in the schedule."""

    vm: str
    src: str
    dst: str
    start_s: float
    end_s: float
    #: (t, bytes/s) at every change of its bandwidth, from its start
    allocations: tuple[tuple[float, float], ...]
    #: the estimate at the bandwidth it started with
    estimate: Estimate
    #: it completes (False: cancelled after making no headway; the VM stays on src)
    converges: bool
    #: why this start time and this bandwidth, in a sentence with figures
    why: str
    #: the downtime predicted at the bandwidth it ends with (0 when it fails)
    downtime_ms: float
    #: the bandwidth it was admitted with at least (bytes/s; 0 for the baselines)
    floor: float = 0.0
    #: the VM whose end let it start (None: it started at the wave's start)
    after: str | None = None
    #: seconds it ran without headway (its share below what it needs)
    stalled_s: float = 0.0

    @property
    def status(self) -> Literal["completed", "failed"]:
        return "completed" if self.converges else "failed"

    def rate_at(self, t: float) -> float:
        """Its bandwidth at ``t`` (0 outside ``[start_s, end_s)``)."""
        if not (self.start_s <= t < self.end_s):
            return 0.0
        rate = 0.0
        for at, r in self.allocations:
            if at <= t + _EPS:
                rate = r
        return rate

    def to_json(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "vm": self.vm, "src": self.src, "dst": self.dst,
            "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
            "status": self.status, "converges": self.converges,
            "allocations": [[round(t, 3), round(r)] for t, r in self.allocations],
            "floor": round(self.floor),
            "estimate": {"time_s": round(e.time_s, 3), "downtime_ms": round(e.downtime_ms, 1),
                         "bytes": round(e.bytes), "converges": e.converges,
                         "postcopy": e.postcopy, "note": e.note},
            "downtime_ms": round(self.downtime_ms, 1),
            "stalled_s": round(self.stalled_s, 3),
            "after": self.after,
            "why": self.why,
        }


@dataclass(frozen=True)
class Schedule:
    """A wave: its entries by start time, the moves refused, and its figures."""

    strategy: Strategy
    entries: tuple[Entry, ...]
    #: (vm, reason) of the moves not scheduled (the product refuses rather than start a
    #: move that cannot finish within the rules)
    refused: tuple[tuple[str, str], ...] = ()
    #: the wave's ETA: from its start to the end of its last migration (s)
    makespan_s: float = 0.0
    downtime_sum_ms: float = 0.0
    downtime_max_ms: float = 0.0
    #: the VMs whose waits decided the makespan, last one first, and why
    critical_path: tuple[str, ...] = ()
    critical_why: str = ""
    #: link -> (t, bytes/s used by the wave) at every change
    links: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def entry(self, vm: str) -> Entry:
        for e in self.entries:
            if e.vm == vm:
                return e
        raise KeyError(vm)

    @property
    def failed(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if not e.converges)

    def to_json(self) -> dict[str, Any]:
        """The schedule as plain data (``--json``)."""
        return {
            "strategy": self.strategy,
            "makespan_s": round(self.makespan_s, 3),
            "downtime_sum_ms": round(self.downtime_sum_ms, 1),
            "downtime_max_ms": round(self.downtime_max_ms, 1),
            "entries": [e.to_json() for e in self.entries],
            "refused": [{"vm": vm, "reason": why} for vm, why in self.refused],
            "failed": [e.vm for e in self.failed],
            "critical_path": {"vms": list(self.critical_path), "why": self.critical_why},
            "links": {name: [[round(t, 3), round(r)] for t, r in points]
                      for name, points in sorted(self.links.items())},
            "notes": list(self.notes),
        }


# -- the simulation ------------------------------------------------------------------------


@dataclass
class _Member:
    move: Move
    vm: Vm
    links: tuple[str, ...]
    lane: float
    need: float
    lane_estimate: Estimate | None = None


@dataclass
class _Unit:
    name: str
    members: list[_Member]
    dst: str
    #: (t, reason) the first time it could not start
    first_block: tuple[float, str] | None = None
    #: every reason it could not start, the last time
    last_block: str = ""
    #: the main reason at each time it could not start, each once, in order
    reasons: list[str] = field(default_factory=list)
    hot: bool = False

    @property
    def names(self) -> str:
        return ", ".join(m.vm.name for m in self.members)


@dataclass
class _Run:
    member: _Member
    unit: _Unit
    start: float
    after: str | None
    why_start: str
    rate: float = -1.0
    est: Estimate | None = None
    first: Estimate | None = None
    done: float = 0.0
    stalled: float = 0.0
    give_up: float | None = None
    last: float = 0.0
    allocs: list[tuple[float, float]] = field(default_factory=list)

    @property
    def vm(self) -> Vm:
        return self.member.vm

    def advance(self, t: float) -> None:
        dt = t - self.last
        if dt > 0 and self.est is not None:
            if self.est.converges:
                self.done += dt / self.est.time_s if self.est.time_s > 0 else 1.0
            else:
                self.stalled += dt
        self.last = max(self.last, t)

    def end_time(self) -> float:
        assert self.est is not None
        if self.est.converges:
            return self.last + max(0.0, 1.0 - self.done) * self.est.time_s
        assert self.give_up is not None
        return self.last + max(0.0, self.give_up - self.stalled)


@dataclass(frozen=True)
class _Rules:
    name: Strategy
    #: links are limited to their allowance (else their capacity)
    budgeted: bool
    #: the product's admission (floors, hosts, affinity, holds)
    product: bool
    #: at most this many units in flight in the whole fleet
    max_running: int | None = None
    #: at most this many out of one host (the baselines' own limit)
    per_node_out: int | None = None


_PRODUCT = _Rules("vmigrate", budgeted=True, product=True)
_BASELINES: dict[Strategy, _Rules] = {
    "sequential": _Rules("sequential", budgeted=True, product=False, max_running=1),
    "all-at-once": _Rules("all-at-once", budgeted=False, product=False),
    "kubevirt": _Rules("kubevirt", budgeted=False, product=False,
                       max_running=KUBEVIRT_PER_CLUSTER, per_node_out=KUBEVIRT_PER_NODE),
    "proxmox": _Rules("proxmox", budgeted=False, product=False, max_running=PROXMOX_WORKERS),
}


class _Memo:
    """The estimator, asked once per VM and bandwidth."""

    def __init__(self, estimator: Estimator) -> None:
        self._est = estimator
        self._seen: dict[tuple[str, float], Estimate] = {}
        self._floors: dict[str, float] = {}

    def estimate(self, vm: Vm, rate: float) -> Estimate:
        key = (vm.name, rate)
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = _sane(self._est.estimate(vm, rate))
        return found

    def min_bandwidth(self, vm: Vm) -> float:
        found = self._floors.get(vm.name)
        if found is None:
            found = self._est.min_bandwidth(vm)
            found = self._floors[vm.name] = found if found >= 0 else 0.0
        return found


def _sane(e: Estimate) -> Estimate:
    """``e`` with a time the simulation can use: a converging estimate with no finite
    time does not converge; one that does not converge gives up in finite time."""
    if e.converges and (math.isfinite(e.time_s) and e.time_s >= 0):
        return e
    give_up = e.time_s if (math.isfinite(e.time_s) and e.time_s > 0) else _GIVE_UP_S
    return Estimate(time_s=give_up, downtime_ms=0.0, bytes=e.bytes, converges=False,
                    postcopy=e.postcopy, note=e.note)


def _water_fill(runs: Sequence[_Run], floors: Sequence[float],
                limit: Mapping[str, float]) -> list[float]:
    """Floors, then what the links have left shared max-min fairly (progressive filling)."""
    rate = list(floors)
    residual = dict(limit)
    for r, f in zip(runs, floors, strict=True):
        for link in r.member.links:
            residual[link] -= f
    active = set(range(len(runs)))
    while active:
        counts: Counter[str] = Counter()
        for i in active:
            counts.update(runs[i].member.links)
        full = {link for link in counts if residual[link] <= _EPS * limit[link]}
        if full:
            active = {i for i in active if not full.intersection(runs[i].member.links)}
            continue
        delta = min(residual[link] / n for link, n in counts.items())
        for i in active:
            rate[i] += delta
            for link in runs[i].member.links:
                residual[link] -= delta
        # the link(s) that set delta are full now (up to rounding): freeze them
        for link, n in counts.items():
            if residual[link] <= _EPS * limit[link] * max(1, n):
                residual[link] = 0.0
    return rate


class _Wave:
    """One simulation of the wave under ``rules``."""

    def __init__(self, fleet: Fleet, units: list[_Unit], memo: _Memo, rules: _Rules, *,
                 serial: bool = False, min_share: float = MIN_SHARE) -> None:
        self.fleet = fleet
        self.min_share = min_share
        self.memo = memo
        self.rules = rules
        self.serial = serial
        self.waiting = list(units)
        self.running: list[_Run] = []
        self.finished: list[Entry] = []
        self.refused: list[tuple[str, str]] = []
        self.limit = {link.name: (link.allowance if rules.budgeted else link.capacity)
                      for link in fleet.links}
        # where every VM is: a set of hosts (a VM in flight is on both)
        self.at: dict[str, set[str]] = {v.name: {v.host} for v in fleet.vms}
        self.memory = {h.name: 0 for h in fleet.hosts}
        for v in fleet.vms:
            self.memory[v.host] += v.memory
        self.outgoing: Counter[str] = Counter()
        self.incoming: Counter[str] = Counter()
        self.floor_on: defaultdict[str, float] = defaultdict(float)
        self.usage: dict[str, list[tuple[float, float]]] = {}
        self.ended_now: list[Entry] = []

    # -- admission

    def _product_block(self, unit: _Unit, held: Mapping[str, tuple[str, float]], t: float
                       ) -> list[tuple[str | None, str]]:
        """What keeps ``unit`` from starting now: (resource it holds or None, reason)."""
        fleet = self.fleet
        dst = fleet.host(unit.dst)
        out: list[tuple[str | None, str]] = []
        if self.serial and self.running:
            return [(None, "one unit at a time")]
        for src, k in sorted(Counter(m.move.src for m in unit.members).items()):
            host = fleet.host(src)
            if self.outgoing[src] + k > host.max_out:
                out.append((f"out:{src}", f"{src} already sends {self.outgoing[src]} "
                            f"migration{'s' if self.outgoing[src] != 1 else ''} "
                            f"(max_out {host.max_out})"
                            + (f" and the unit needs {k}" if k > 1 else "")))
        k = len(unit.members)
        if self.incoming[dst.name] + k > dst.max_in:
            out.append((f"in:{dst.name}", f"{dst.name} already receives "
                        f"{self.incoming[dst.name]} (max_in {dst.max_in})"
                        + (f" and the unit needs {k}" if k > 1 else "")))
        need = sum(m.vm.memory for m in unit.members)
        free = dst.capacity - self.memory[dst.name]
        if need > free:
            out.append((f"mem:{dst.name}", f"{dst.name} has {fmt_size(max(free, 0))} free "
                        f"counting the memory reserved by migrations in flight, "
                        f"{unit.names} need{'s' if len(unit.members) == 1 else ''} "
                        f"{fmt_size(need)}"))
        inside = {m.vm.name for m in unit.members}
        for m in unit.members:
            key = m.vm.anti_affinity
            if key is None:
                continue
            for other in fleet.vms:
                if other.anti_affinity == key and other.name not in inside \
                        and dst.name in self.at[other.name]:
                    where = ("on" if self.at[other.name] == {dst.name}
                             else "in flight to or from")
                    out.append((None, f"anti-affinity {key!r}: {other.name} is {where} "
                                f"{dst.name}"))
                    break
        adds: defaultdict[str, float] = defaultdict(float)
        for m in unit.members:
            for link in m.links:
                adds[link] += m.need
        for link, add in sorted(adds.items()):
            allowance = self.limit[link]
            if self.floor_on[link] + add > allowance * (1 + _EPS):
                users = [r.vm.name for r in self.running if link in r.member.links]
                lk = fleet.link(link)
                out.append((f"link:{link}", f"{link}: {len(users)} migration"
                            f"{'s' if len(users) != 1 else ''} ({', '.join(users)}) are guaranteed "
                            f"{fmt_rate(self.floor_on[link])} of its {fmt_rate(allowance)} "
                            f"({lk.budget:.0%} of {fmt_rate(lk.capacity)}), "
                            f"{unit.names} need{'s' if len(unit.members) == 1 else ''} "
                            f"{fmt_rate(add)}"))
        if not out:
            for res in _resources(unit):
                if res not in held:
                    continue
                name, free_at = held[res]
                done_at = t + self._duration(unit)
                if done_at > free_at * (1 + 1e-9) + _EPS:
                    when = (f", free by about {free_at:.0f} s and it would run to "
                            f"{done_at:.0f} s" if math.isfinite(free_at) else "")
                    out.append((None, f"{name} waits for {_resource_text(res)} first{when}"))
                    break
        return out

    def _duration(self, unit: _Unit) -> float:
        """How long ``unit`` takes at its floors, by the estimates (the longest member)."""
        return max(self.memo.estimate(m.vm, m.need).time_s for m in unit.members)

    def _ends(self, runs: Iterable[_Run]) -> list[tuple[float, _Run]]:
        """When ``runs`` are expected to end, soonest first (one started at this event
        has no rate yet: at its floor)."""
        out = []
        for r in runs:
            end = (r.end_time() if r.est is not None else
                   r.start + self.memo.estimate(r.vm, r.member.need).time_s)
            out.append((end, r))
        return sorted(out, key=lambda e: (e[0], e[1].vm.name))

    def _free_at(self, unit: _Unit, res: str) -> float:
        """When ``res`` is expected to have room for ``unit``, as the migrations running
        now end (inf: not by their ends alone). EASY backfilling's reservation: units
        after ``unit`` may use ``res`` only if they are done by then."""
        kind, name = res.split(":", 1)
        fleet = self.fleet
        if kind == "out":
            short = self.outgoing[name] + sum(m.move.src == name for m in unit.members) \
                - fleet.host(name).max_out
            ends = [e for e, r in self._ends(r for r in self.running if r.member.move.src == name)]
            return ends[short - 1] if 0 < short <= len(ends) else math.inf
        if kind == "in":
            short = self.incoming[name] + len(unit.members) - fleet.host(name).max_in
            ends = [e for e, r in self._ends(r for r in self.running if r.member.move.dst == name)]
            return ends[short - 1] if 0 < short <= len(ends) else math.inf
        if kind == "mem":
            lack = (self.memory[name] + sum(m.vm.memory for m in unit.members)
                    - fleet.host(name).capacity)
            leaving = self._ends(r for r in self.running if r.member.move.src == name)
            for end, r in leaving:
                lack -= r.vm.memory
                if lack <= 0:
                    return end
            return math.inf
        lack_bw = self.floor_on[name] + sum(m.need for m in unit.members if name in m.links) \
            - self.limit[name] * (1 + _EPS)
        for end, r in self._ends(r for r in self.running if name in r.member.links):
            lack_bw -= r.member.need
            if lack_bw <= 0:
                return end
        return math.inf

    def _baseline_block(self, unit: _Unit) -> str | None:
        rules = self.rules
        if rules.max_running is not None and len(self.running) >= rules.max_running:
            return (f"{len(self.running)} migration{'s' if len(self.running) != 1 else ''} "
                    f"in flight, at most {rules.max_running}")
        if rules.per_node_out is not None:
            src = unit.members[0].move.src
            if self.outgoing[src] >= rules.per_node_out:
                return f"{src} already sends {self.outgoing[src]} (at most {rules.per_node_out})"
        return None

    def admit(self, t: float) -> None:
        started = self._admit_pass(t, holds=True)
        if self.rules.product and not self.running and self.waiting and not started:
            self._admit_pass(t, holds=False)
            if not self.running:
                for unit in self.waiting:
                    for m in unit.members:
                        self.refused.append((m.vm.name, "would never start: " + (
                            unit.last_block or "nothing left that frees room for it")))
                self.waiting = []

    def _admit_pass(self, t: float, *, holds: bool) -> bool:
        if self.rules.product:
            return self._admit_product(t, holds=holds)
        started = False
        for unit in list(self.waiting):
            block = self._baseline_block(unit)
            if block is not None:
                if unit.first_block is None:
                    unit.first_block = (t, block)
                if self.rules.per_node_out is None:
                    break  # strict order: one queue
                continue
            self._start(unit, t)
            started = True
        return started

    def _admit_product(self, t: float, *, holds: bool) -> bool:
        """Two passes in priority order: first the units that add throughput (every
        link of theirs has room left once the running ones have their shares), then
        the others the rules let start (they share a full link)."""
        held: dict[str, tuple[str, float]] = {}
        started = False
        for adding in (True, False):
            spare = self._spare() if adding else {}
            for unit in list(self.waiting):
                blocks = self._product_block(unit, held if holds else {}, t)
                if blocks:
                    reason = next((why for res, why in blocks if res is not None),
                                  blocks[0][1])
                    if unit.first_block is None:
                        unit.first_block = (t, reason)
                    unit.last_block = "; ".join(why for _, why in blocks)
                    if reason not in unit.reasons:
                        unit.reasons.append(reason)
                    for res, _ in blocks:
                        if res is not None and res not in held:
                            held[res] = (unit.names, self._free_at(unit, res))
                    continue
                links = {link for m in unit.members for link in m.links}
                if adding and any(spare[link] <= _EPS * self.limit[link] for link in links):
                    continue
                self._start(unit, t)
                started = True
                if adding:
                    spare = self._spare()
        return started

    def _spare(self) -> dict[str, float]:
        """What each link has left once the running migrations have their shares."""
        rates = _water_fill(self.running, [r.member.need for r in self.running], self.limit)
        left = dict(self.limit)
        for r, rate in zip(self.running, rates, strict=True):
            for link in r.member.links:
                left[link] -= rate
        return left

    def _trigger(self, unit: _Unit) -> str | None:
        """The VM whose end (now) let ``unit`` start."""
        if not self.ended_now:
            return None
        mine = {unit.dst, *(m.move.src for m in unit.members)}
        links = {link for m in unit.members for link in m.links}
        for e in self.ended_now:
            theirs = {e.src, e.dst}
            if mine & theirs or links & set(self.fleet.links_of(e.src, e.dst)):
                return e.vm
        return self.ended_now[0].vm

    def _start(self, unit: _Unit, t: float) -> None:
        self.waiting.remove(unit)
        after = self._trigger(unit) if t > 0 else None
        for m in unit.members:
            v = m.vm
            self.at[v.name] = {m.move.src, m.move.dst}
            self.memory[m.move.dst] += v.memory
            self.outgoing[m.move.src] += 1
            self.incoming[m.move.dst] += 1
            if self.rules.product:
                for link in m.links:
                    self.floor_on[link] += m.need
            self.running.append(_Run(member=m, unit=unit, start=t, after=after,
                                     why_start=self._why_start(unit, m, t, after), last=t))

    def _why_start(self, unit: _Unit, m: _Member, t: float, after: str | None) -> str:
        rules = self.rules
        if t <= 0:
            head = "starts at once"
        else:
            waited = unit.first_block
            head = ""
            if waited is not None:
                why = unit.reasons or [waited[1]]
                more = f"; then {len(why) - 3} more" if len(why) > 3 else ""
                head = f"waits {t - waited[0]:.0f} s ({'; then '.join(why[:3])}{more}); "
            head += f"starts at {t:.0f} s" + (f" when {after} ends" if after else "")
        if rules.product:
            bits = [head]
            if len(unit.members) > 1:
                bits.append(f"with its unit ({unit.names}) to {unit.dst}")
            if self.serial:
                bits.append("one unit at a time")
            floor = f"at least {fmt_rate(m.need)} of its {self._lane(m)}"
            if m.need >= m.lane * (1 - 1e-6) and self.memo.min_bandwidth(m.vm) > m.lane:
                floor = (f"the whole of its {fmt_rate(m.lane)} lane (the guest dirties "
                         f"{fmt_rate(m.vm.dirty_rate)}: no share of this lane beats it, it "
                         f"goes alone on it, {_how(m)})")
            elif unit.hot and m.need > self.min_share * m.lane * (1 + 1e-6):
                floor += (f": the guest dirties {fmt_rate(m.vm.dirty_rate)} and needs "
                          f"{fmt_rate(m.need)} to converge, so it starts only with that much, "
                          "never in a fair share it cannot converge in")
            bits.append(floor)
            return "; ".join(bits)
        if rules.name == "sequential":
            return f"{head}; one at a time, alone on its {self._lane(m)}"
        if rules.name == "all-at-once":
            return f"{head}: everything starts together, fair share of the links"
        if rules.name == "kubevirt":
            return (f"{head}; random order, at most {KUBEVIRT_PER_CLUSTER} in flight and "
                    f"{KUBEVIRT_PER_NODE} out of a node, fair share of the links")
        return (f"{head}; {PROXMOX_WORKERS} workers, VMs by name, fair share of the links")

    def _lane(self, m: _Member) -> str:
        """``m``'s lane in words: its rate and the link that sets it."""
        lane = f"{fmt_rate(m.lane)} lane"
        if len(m.links) == 1:
            return f"{lane} ({m.links[0]})"
        a, b = m.links
        if self.limit[a] == self.limit[b]:
            return f"{lane} ({a} and {b})"
        narrow = a if self.limit[a] < self.limit[b] else b
        return f"{lane} ({narrow}, the narrower of {a} and {b})"

    # -- bandwidth

    def allocate(self, t: float) -> None:
        runs = self.running
        floors = [r.member.need if self.rules.product else 0.0 for r in runs]
        rates = _water_fill(runs, floors, self.limit)
        for r, rate in zip(runs, rates, strict=True):
            if r.est is not None and abs(rate - r.rate) <= _EPS * max(r.rate, 1.0):
                continue
            r.rate = rate
            r.est = self.memo.estimate(r.vm, rate)
            if r.first is None:
                r.first = r.est
            if not r.est.converges and r.give_up is None:
                r.give_up = r.est.time_s
            if r.allocs and r.allocs[-1][0] == t:
                r.allocs.pop()  # allocated again at the same instant
            if not r.allocs or r.allocs[-1][1] != rate:
                r.allocs.append((t, rate))
        totals: defaultdict[str, float] = defaultdict(float)
        for r in runs:
            for link in r.member.links:
                totals[link] += r.rate
        for link in set(totals) | set(self.usage):
            points = self.usage.setdefault(link, [])
            value = totals.get(link, 0.0)
            if points and points[-1][0] == t:
                points.pop()  # allocated again at the same instant
            if not points or abs(points[-1][1] - value) > _EPS * max(1.0, value):
                points.append((t, value))

    # -- ends

    def _finish(self, r: _Run, t: float) -> None:
        assert r.est is not None and r.first is not None
        m = r.member
        ok = r.est.converges
        v = m.vm
        self.at[v.name] = {m.move.dst} if ok else {m.move.src}
        self.memory[m.move.src if ok else m.move.dst] -= v.memory
        self.outgoing[m.move.src] -= 1
        self.incoming[m.move.dst] -= 1
        if self.rules.product:
            for link in m.links:
                self.floor_on[link] -= m.need
                if self.floor_on[link] < _EPS * self.limit[link]:
                    self.floor_on[link] = 0.0
        why = r.why_start
        first_rate = r.allocs[0][1]
        share = (f"given {fmt_rate(first_rate)}" +
                 (" (its whole lane)" if first_rate >= m.lane * (1 - 1e-6) else
                  f" of its {fmt_rate(m.lane)} lane, sharing {' and '.join(m.links)}"))
        why += f"; {share}"
        low, top = (f(rate for _, rate in r.allocs) for f in (min, max))
        if low < first_rate:
            why += f", down to {fmt_rate(low)} while others start"
        if top > first_rate:
            why += f", up to {fmt_rate(top)} as others end"
        if ok:
            first = (f"predicted {r.first.time_s:.0f} s at its first rate" if r.first.converges
                     else "not converging at its first rate")
            why += (f"; done at {t:.0f} s ({t - r.start:.0f} s, {first}), downtime "
                    f"{r.est.downtime_ms:.0f} ms" + (" (post-copy)" if r.est.postcopy else ""))
            if r.stalled > 0:
                why += f", after {r.stalled:.0f} s without headway"
        else:
            need = self.memo.min_bandwidth(v)
            why += (f"; does not converge at {fmt_rate(low)}" +
                    (f" (it needs {fmt_rate(need)})" if 0 < need < math.inf else "") +
                    f": no headway for {r.stalled:.0f} s, cancelled at {t:.0f} s, "
                    f"{v.name} stays on {m.move.src}")
        self.finished.append(Entry(
            vm=v.name, src=m.move.src, dst=m.move.dst, start_s=r.start, end_s=t,
            allocations=tuple(r.allocs), estimate=r.first, converges=ok, why=why,
            downtime_ms=r.est.downtime_ms if ok else 0.0,
            floor=m.need if self.rules.product else 0.0, after=r.after, stalled_s=r.stalled))

    def run(self) -> None:
        """Simulate the wave to its end: admit and allocate at every event, then run
        to the next end."""
        t = 0.0
        while True:
            self.allocate(t)  # the shares of those still running, for the reservations
            self.admit(t)
            self.allocate(t)
            self.ended_now = []
            if not self.running:
                # the baselines always start one when nothing runs; the product refuses
                # what can never start
                assert not self.waiting, "wave stuck"
                return
            t = self._step()

    def _step(self) -> float:
        """Run to the next end; the migrations that end then are in ``ended_now``."""
        t_next = min(r.end_time() for r in self.running)
        for r in self.running:
            r.advance(t_next)
        tol = _EPS * max(1.0, t_next)
        ended = sorted((r for r in self.running if r.end_time() <= t_next + tol),
                       key=lambda r: r.vm.name)
        for r in ended:
            self.running.remove(r)
            self._finish(r, t_next)
        self.ended_now = self.finished[len(self.finished) - len(ended):]
        return t_next


def _how(m: _Member) -> str:
    e = m.lane_estimate
    if e is None:
        return "by its estimate"
    return "post-copy" if e.postcopy else (e.note or "by its estimate")


def _resources(unit: _Unit) -> list[str]:
    out = [f"in:{unit.dst}", f"mem:{unit.dst}"]
    for m in unit.members:
        out.append(f"out:{m.move.src}")
        out += [f"link:{link}" for link in m.links]
    return out


def _resource_text(res: str) -> str:
    kind, name = res.split(":", 1)
    return {"in": f"a slot into {name}", "out": f"a slot out of {name}",
            "mem": f"memory on {name}", "link": f"room on {name}"}[kind]


# -- setting the wave up --------------------------------------------------------------------


def _validate(fleet: Fleet, moves: Sequence[Move]) -> None:
    seen: set[str] = set()
    for m in moves:
        vm = fleet.vm(m.vm)
        fleet.host(m.dst)
        if m.src != vm.host:
            raise FleetError(f"move of {m.vm} from {m.src}: it runs on {vm.host}")
        if m.dst == m.src:
            raise FleetError(f"move of {m.vm}: source and destination are both {m.src}")
        if m.vm in seen:
            raise FleetError(f"{m.vm} is moved twice in one wave")
        seen.add(m.vm)
    by_vm = {m.vm: m for m in moves}
    for unit in _units(fleet.vm(name) for name in by_vm):
        dsts = sorted({by_vm[v.name].dst for v in unit})
        if len(dsts) > 1:
            raise FleetError(f"{', '.join(v.name for v in unit)} share a group or an affinity "
                             f"key and move together, but to {', '.join(dsts)}")


def _member(fleet: Fleet, memo: _Memo, move: Move, *, rules: _Rules, min_share: float
            ) -> _Member:
    """The move as the simulation runs it: its links, its lane (what it gets alone: the
    allowances, or the capacities for a baseline without a budget) and its floor."""
    vm = fleet.vm(move.vm)
    links = fleet.links_of(move.src, move.dst)
    if rules.budgeted:
        lane = fleet.lane(move.src, move.dst)
    else:
        lane = min(fleet.link(link).capacity for link in links)
    need = 0.0
    if rules.product:
        need = min(lane, max(memo.min_bandwidth(vm), min_share * lane))
    return _Member(move=move, vm=vm, links=links, lane=lane, need=need)


def _refusal(fleet: Fleet, memo: _Memo, unit: _Unit, moving: Mapping[str, Move]
             ) -> str | None:
    """Why the product will not start ``unit`` at all (None: it may)."""
    dst = fleet.host(unit.dst)
    if dst.state != "active":
        return f"{dst.name} is {dst.state}: it receives nothing"
    if len(unit.members) > dst.max_in:
        return (f"its unit ({unit.names}) starts together and {dst.name} takes at most "
                f"{dst.max_in} in at a time")
    for src, k in Counter(m.move.src for m in unit.members).items():
        if k > fleet.host(src).max_out:
            return (f"its unit ({unit.names}) starts together and {src} sends at most "
                    f"{fleet.host(src).max_out} at a time")
    needs: defaultdict[str, float] = defaultdict(float)
    for m in unit.members:
        for link in m.links:
            needs[link] += m.need
    for link, need in sorted(needs.items()):
        if need > fleet.link(link).allowance * (1 + _EPS):
            return (f"its unit ({unit.names}) starts together and needs {fmt_rate(need)} on "
                    f"{link}, which allows {fmt_rate(fleet.link(link).allowance)}")
    for attr in ("group", "affinity"):
        keys = {getattr(m.vm, attr) for m in unit.members} - {None}
        for key in sorted(keys):
            members = [v for v in fleet.vms if getattr(v, attr) == key]
            before = {v.host for v in members}
            after = {moving[v.name].dst if v.name in moving else v.host for v in members}
            if len(before) == 1 and len(after) > 1:
                stay = [v.name for v in members if v.name not in moving]
                return (f"{attr} {key!r}: {', '.join(stay)} stay"
                        f"{'s' if len(stay) == 1 else ''} on {next(iter(before))}, the move "
                        "would split them")
    inside = {m.vm.name for m in unit.members}
    for i, a in enumerate(unit.members):
        for b in unit.members[i + 1:]:
            key = a.vm.anti_affinity
            if key is not None and b.vm.anti_affinity == key and a.vm.host != b.vm.host:
                return (f"{a.vm.name} and {b.vm.name} move together (group or affinity) but "
                        f"anti-affinity {key!r} keeps them apart")
    staying = [v for v in fleet.vms if v.host == dst.name and v.name not in moving]
    need = sum(m.vm.memory for m in unit.members)
    room = dst.capacity - sum(v.memory for v in staying)
    if need > room:
        kept = (f" beside the {fmt_size(dst.capacity - room)} of VMs staying there"
                if staying else "")
        return (f"{dst.name} has {fmt_size(max(room, 0))} for VMs{kept}, {unit.names} "
                f"need{'s' if len(unit.members) == 1 else ''} {fmt_size(need)}")
    for m in unit.members:
        key = m.vm.anti_affinity
        clash = [v.name for v in staying if key is not None and v.anti_affinity == key
                 and v.name not in inside]
        if clash:
            return (f"anti-affinity {key!r}: {clash[0]} stays on {dst.name}")
    for m in unit.members:
        est = memo.estimate(m.vm, m.lane)
        m.lane_estimate = est
        if not est.converges:
            return (f"{m.vm.name} does not converge even alone on its {fmt_rate(m.lane)} lane "
                    f"({' and '.join(m.links)}): {est.note or 'the estimate says so'}")
    return None


def _order(fleet: Fleet, memo: _Memo, units: list[_Unit], limit: Mapping[str, float]
           ) -> list[_Unit]:
    """Bottleneck first, hot first, longest first, then by name (see the module doc)."""
    load: defaultdict[str, float] = defaultdict(float)
    for u in units:
        for m in u.members:
            est = m.lane_estimate or memo.estimate(m.vm, m.lane)
            for link in m.links:
                load[link] += est.time_s * m.lane / limit[link]

    def key(u: _Unit) -> tuple[float, bool, float, str]:
        bottleneck = max(load[link] for m in u.members for link in m.links)
        longest = max((m.lane_estimate or memo.estimate(m.vm, m.lane)).time_s
                      for m in u.members)
        return (-round(bottleneck, 6), not u.hot, -round(longest, 6), u.members[0].vm.name)

    return sorted(units, key=key)


def _simulate(fleet: Fleet, units: list[_Unit], memo: _Memo, rules: _Rules, *,
              serial: bool = False, min_share: float = MIN_SHARE) -> _Wave:
    wave = _Wave(fleet, [_copy(u) for u in units], memo, rules, serial=serial,
                 min_share=min_share)
    wave.run()
    return wave


def _copy(u: _Unit) -> _Unit:
    return _Unit(name=u.name, members=u.members, dst=u.dst, hot=u.hot)


def _critical(entries: Sequence[Entry]) -> tuple[tuple[str, ...], str]:
    if not entries:
        return (), "nothing to move"
    by_vm = {e.vm: e for e in entries}
    last = max(entries, key=lambda e: (e.end_s, e.vm))
    chain = [last]
    while chain[-1].after is not None and chain[-1].after in by_vm \
            and by_vm[chain[-1].after] not in chain:
        chain.append(by_vm[chain[-1].after])
    bits = [f"the wave ends at {last.end_s:.0f} s with {last.vm} ({last.src} -> {last.dst}, "
            f"{last.end_s - last.start_s:.0f} s)"]
    for e in chain:
        if e.after is not None:
            bits.append(f"{e.vm} started at {e.start_s:.0f} s when {e.after} ended")
        else:
            bits.append(f"{e.vm} started at {e.start_s:.0f} s, with the wave")
    return tuple(e.vm for e in chain), "; ".join(bits)


def _result(strategy: Strategy, wave: _Wave, refused: Sequence[tuple[str, str]],
            notes: Sequence[str]) -> Schedule:
    entries = sorted(wave.finished, key=lambda e: (e.start_s, e.vm))
    done = [e for e in entries if e.converges]
    path, why = _critical(entries)
    return Schedule(
        strategy=strategy, entries=tuple(entries),
        refused=tuple(refused) + tuple(wave.refused),
        makespan_s=max((e.end_s for e in entries), default=0.0),
        downtime_sum_ms=sum(e.downtime_ms for e in done),
        downtime_max_ms=max((e.downtime_ms for e in done), default=0.0),
        critical_path=path, critical_why=why,
        links={k: tuple(v) for k, v in sorted(wave.usage.items())}, notes=tuple(notes))


def schedule(fleet: Fleet, moves: Iterable[Move], estimator: Estimator,
             strategy: Strategy = "vmigrate", *, seed: int = 0,
             min_share: float = MIN_SHARE) -> Schedule:
    """The schedule of ``moves`` under ``strategy`` (see the module doc).

    Raises :class:`~vmigrate.plan.fleet.model.FleetError` for a move of an unknown VM or
    host, from a host the VM is not on, to its own host, a VM moved twice, a group or
    affinity key sent to two destinations, an unknown strategy, or ``min_share`` outside
    (0, 1]. Moves the product will not run are in :attr:`Schedule.refused`, never
    started."""
    if strategy not in STRATEGIES:
        raise FleetError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    if not (0 < min_share <= 1):
        raise FleetError(f"min_share must be above 0 and at most 1, not {min_share}")
    moves = list(moves)
    _validate(fleet, moves)
    memo = _Memo(estimator)
    notes: list[str] = []
    if strategy != "vmigrate":
        rules = _BASELINES[strategy]
        order = list(moves)
        if strategy == "kubevirt":
            random.Random(seed).shuffle(order)
            notes.append(f"random order, seed {seed}")
        elif strategy == "proxmox":
            order.sort(key=lambda m: m.vm)
            targets = sorted({m.dst for m in moves})
            if len(targets) > 1:
                notes.append(f"Proxmox migrateall sends to one target node; these moves go "
                             f"to {', '.join(targets)}")
        units = [_Unit(name=m.vm, members=[_member(fleet, memo, m, rules=rules,
                                                   min_share=min_share)], dst=m.dst)
                 for m in order]
        wave = _simulate(fleet, units, memo, rules)
        return _result(strategy, wave, (), notes)
    rules = _PRODUCT
    by_vm = {m.vm: m for m in moves}
    refused: list[tuple[str, str]] = []
    units = []
    for group in _units(fleet.vm(m.vm) for m in moves):
        members = [_member(fleet, memo, by_vm[v.name], rules=rules, min_share=min_share)
                   for v in group]
        unit = _Unit(name=", ".join(v.name for v in group), members=members,
                     dst=by_vm[group[0].name].dst)
        unit.hot = any(m.need > min_share * m.lane * (1 + 1e-6) for m in members)
        reason = _refusal(fleet, memo, unit, by_vm)
        if reason is not None:
            refused += [(m.vm.name, reason) for m in members]
            continue
        units.append(unit)
    limit = {link.name: link.allowance for link in fleet.links}
    units = _order(fleet, memo, units, limit)
    wave = _simulate(fleet, units, memo, rules, min_share=min_share)
    if len(units) > 1:
        serial = _simulate(fleet, units, memo, rules, serial=True, min_share=min_share)
        concurrent_s = max((e.end_s for e in wave.finished), default=0.0)
        serial_s = max((e.end_s for e in serial.finished), default=0.0)
        if serial_s < concurrent_s * (1 - 1e-9) and len(serial.refused) <= len(wave.refused):
            notes.append(f"one unit at a time: {serial_s:.0f} s against {concurrent_s:.0f} s "
                         "sharing the links (the guests resend more at a share than sharing "
                         "saves)")
            wave = serial
        else:
            notes.append(f"sharing the links: {concurrent_s:.0f} s against {serial_s:.0f} s "
                         "one unit at a time")
    return _result(strategy, wave, refused, notes)
