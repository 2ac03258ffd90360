"""Every rule a schedule breaks, at any instant of it (pure).

:func:`check_schedule` replays a :class:`~vmigrate.plan.fleet.schedule.Schedule` on
its :class:`~vmigrate.plan.fleet.model.Fleet`. A migration is in flight over
``[start_s, end_s)``; in flight, its VM counts on both hosts (its memory is reserved on
the destination from the start and freed on the source at the end); once ended it is
on its destination, or on its source when it failed. At every start, end and change of
bandwidth it checks:

* links: what the migrations in flight use of each link stays within its allowance;
* hosts: the memory of the VMs on a host stays within ``memory - reserve_memory``
  (a host already over it before the wave is only reported when it gets worse);
  at most ``max_out`` migrations out of and ``max_in`` into a host at a time;
* affinity: no two VMs with the same ``anti_affinity`` key share a host, and the VMs
  with the same ``affinity`` key share one (a rule the fleet already broke before the
  wave is :meth:`~vmigrate.plan.fleet.model.Fleet.violations`' business, not this);

and over the whole schedule, that a ``group`` moves to one destination, whole (when
it was on one host before), and is split over two hosts for no longer than its
longest member's migration takes.

Each broken rule is reported once, at the first instant it is broken.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from vmigrate.plan.fleet.model import Fleet, Vm, fmt_rate, fmt_size
from vmigrate.plan.fleet.schedule import Entry, Schedule

__all__ = ["check_schedule"]

_REL = 1e-6


def _keyed(vms: Iterable[Vm], attr: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in vms:
        key = getattr(v, attr)
        if key is not None:
            out.setdefault(key, []).append(v.name)
    return out


def check_schedule(schedule: Schedule, fleet: Fleet) -> list[str]:
    """Every violation of the rules in ``schedule`` (see the module doc); [] when none."""
    out: list[str] = []
    reported: set[tuple[str, ...]] = set()

    def report(key: tuple[str, ...], t: float, text: str) -> None:
        if key not in reported:
            reported.add(key)
            out.append(f"at {t:.1f} s: {text}")

    entries = list(schedule.entries)
    for e in entries:
        if e.vm not in {v.name for v in fleet.vms}:
            out.append(f"{e.vm} is in the schedule but not in the fleet")
            return out
    start = {v.name: frozenset({v.host}) for v in fleet.vms}
    memory = {v.name: v.memory for v in fleet.vms}
    anti = _keyed(fleet.vms, "anti_affinity")
    affinity = _keyed(fleet.vms, "affinity")

    def used(at: dict[str, frozenset[str]]) -> Counter[str]:
        c: Counter[str] = Counter()
        for name, hosts in at.items():
            for h in hosts:
                c[h] += memory[name]
        return c

    used0 = used(start)
    times = sorted({0.0, *(e.start_s for e in entries), *(e.end_s for e in entries),
                    *(t for e in entries for t, _ in e.allocations)})
    for t in times:
        flying = [e for e in entries if e.start_s <= t < e.end_s]
        at = dict(start)
        for e in entries:
            if e.end_s <= t:
                at[e.vm] = frozenset({e.dst if e.converges else e.src})
        for e in flying:
            at[e.vm] = frozenset({e.src, e.dst})
        _links(fleet, flying, t, report)
        for host in fleet.hosts:
            outs = [e.vm for e in flying if e.src == host.name]
            ins = [e.vm for e in flying if e.dst == host.name]
            if len(outs) > host.max_out:
                report(("out", host.name), t, f"{len(outs)} migrations out of {host.name} "
                       f"({', '.join(outs)}), max_out {host.max_out}")
            if len(ins) > host.max_in:
                report(("in", host.name), t, f"{len(ins)} migrations into {host.name} "
                       f"({', '.join(ins)}), max_in {host.max_in}")
        now = used(at)
        for host in fleet.hosts:
            if now[host.name] > host.capacity and now[host.name] > used0[host.name]:
                report(("memory", host.name), t,
                       f"{host.name} holds {fmt_size(now[host.name])} of VMs, counting "
                       f"migrations in flight, more than its {fmt_size(host.capacity)}")
        for key, names in anti.items():
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    shared = at[a] & at[b]
                    if shared and not (start[a] & start[b]):
                        report(("anti", key, a, b), t,
                               f"anti-affinity {key!r}: {a} and {b} share "
                               f"{', '.join(sorted(shared))}")
        for key, names in affinity.items():
            if frozenset.intersection(*(at[n] for n in names)) == frozenset() \
                    and frozenset.intersection(*(start[n] for n in names)):
                spread = sorted({h for n in names for h in at[n]})
                report(("affinity", key), t, f"affinity {key!r}: "
                       f"{', '.join(names)} share no host (on {', '.join(spread)})")
    _groups(fleet, entries, out)
    return out


_Report = Callable[[tuple[str, ...], float, str], None]


def _links(fleet: Fleet, flying: list[Entry], t: float, report: _Report) -> None:
    totals: defaultdict[str, float] = defaultdict(float)
    users: dict[str, list[str]] = {}
    for e in flying:
        rate = e.rate_at(t)
        for link in fleet.links_of(e.src, e.dst):
            totals[link] += rate
            users.setdefault(link, []).append(e.vm)
    for name, total in totals.items():
        lk = fleet.link(name)
        if total > lk.allowance * (1 + _REL) + 1e-6:
            report(("link", name), t,
                   f"{name} carries {fmt_rate(total)} ({', '.join(users[name])}), more than "
                   f"its allowance of {fmt_rate(lk.allowance)} ({lk.budget:.0%} of "
                   f"{fmt_rate(lk.capacity)})")


def _groups(fleet: Fleet, entries: list[Entry], out: list[str]) -> None:
    by_vm = {e.vm: e for e in entries}
    groups: dict[str, list[Vm]] = {}
    for v in fleet.vms:
        if v.group is not None:
            groups.setdefault(v.group, []).append(v)
    for key, members in sorted(groups.items()):
        moved = [by_vm[v.name] for v in members if v.name in by_vm]
        if not moved:
            continue
        dsts = sorted({e.dst for e in moved})
        if len(dsts) > 1:
            out.append(f"group {key!r} moves to {', '.join(dsts)}: a group moves to one host")
            continue
        ends = {e.dst if e.converges else e.src for e in moved}
        ends |= {v.host for v in members if v.name not in by_vm}
        if len(ends) > 1 and len({v.host for v in members}) == 1:
            left = sorted(v.name for v in members
                          if v.name not in by_vm or not by_vm[v.name].converges)
            out.append(f"group {key!r} ends split: {', '.join(left)} stay"
                       f"{'s' if len(left) == 1 else ''} behind, the rest go to {dsts[0]}")
            continue
        split = max(e.end_s for e in moved) - min(e.end_s for e in moved)
        longest = max(e.end_s - e.start_s for e in moved)
        if split > longest * (1 + _REL) + 1e-6:
            out.append(f"group {key!r} is split over two hosts for {split:.1f} s, longer than "
                       f"its longest migration ({longest:.1f} s)")
