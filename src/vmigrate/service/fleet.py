"""The fleet as it stands, for the wave planner: the inventory, the store and the hosts
turned into a :class:`~vmigrate.plan.fleet.Fleet`, and waves planned on it.

:func:`current_fleet` reads

* every inventory host: its capacity (declared, else measured on the host:
  :mod:`vmigrate.service.capacity`), reserve, effective state (the store's, else the
  inventory's), links and migration caps. A host that was neither declared nor
  measured (unreachable, no ``memory =``) is taken as ``maintenance``: nothing is
  placed on it, and the fleet's notes say so;
* every link a host names: ``[links.NAME]``'s capacity, else the best bandwidth the
  newest assessments measured across it (``vmigrate assess``'s probe); a link with
  neither is an error naming it, before anything is planned;
* every VM vmigrate manages: its memory (spec), the CPUs its process used (else its
  vCPUs), its dirty rate, working set and disks from its newest assessment (none: an
  idle guest is assumed, stated in the notes), its tier and its groups
  (``[groups.NAME]``: ``together`` -> one group key; ``apart`` -> an anti-affinity
  key; the planner takes one ``apart`` group per VM, a VM in two is refused).

:func:`plan_wave` then places (``--evacuate``, ``--rebalance``, or the plan file's
moves) and schedules with the product's scheduler. Nothing here changes anything.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmigrate import validate
from vmigrate.config import Inventory, groups_for
from vmigrate.errors import ConfigError, UserError
from vmigrate.plan.assessment import Assessment
from vmigrate.plan.decide import tier_for
from vmigrate.plan.fleet import (
    Fleet,
    Host,
    Link,
    ModelEstimator,
    Move,
    Placement,
    Schedule,
    Strategy,
    Vm,
    plan_evacuation,
    plan_rebalance,
    schedule,
)
from vmigrate.plan.fleet.model import HostState, Mode
from vmigrate.qemu.spec import VMSpec
from vmigrate.service.capacity import HostUsage, fleet_usage
from vmigrate.service.planning import planning_config
from vmigrate.store import Store

__all__ = ["FleetView", "WavePlan", "current_fleet", "plan_wave", "read_plan_file"]

#: assessments older than this are not used for a VM's dirty rate (seconds)
ASSESSMENT_MAX_AGE_S = 7 * 24 * 3600.0
WaveKind = Literal["plan", "evacuate", "rebalance"]


@dataclass
class FleetView:
    """The fleet as read, and what was assumed to read it."""

    fleet: Fleet
    usages: dict[str, HostUsage]
    notes: list[str] = field(default_factory=list)


@dataclass
class WavePlan:
    """A planned wave: where each VM goes, when, at what bandwidth, and why."""

    kind: WaveKind
    view: FleetView
    placement: Placement
    schedule: Schedule
    estimator: ModelEstimator
    host: str | None = None

    def baseline(self, strategy: Strategy) -> Schedule:
        """The same moves under another strategy (``sequential``: one at a time)."""
        return schedule(self.view.fleet, self.placement.moves, self.estimator,
                        strategy=strategy)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "host": self.host, "notes": list(self.view.notes),
                "placement": self.placement.to_json(), "schedule": self.schedule.to_json()}


def _mode(inv: Inventory, host: str, spec: VMSpec, a: Assessment | None) -> Mode:
    """``live`` where the VM's disks need not move (none, or all under a pool that every
    host has at the same path: shared storage, as its newest assessment says when there
    is one), else ``online`` (the disks are mirrored to the destination)."""
    if a is not None:
        return "live" if a.shared_storage else "online"
    shared = [path for name, path in inv.host(host).pools.items()
              if all(h.pools.get(name) == path for h in inv.hosts.values())]
    if all(any(Path(d.path).is_relative_to(p) for p in shared) for d in spec.disks):
        return "live"
    return "online"


def _newest_assessment(store: Store, vm: str, now: float) -> Assessment | None:
    raw = store.list_assessments(vm, since=now - ASSESSMENT_MAX_AGE_S)
    return Assessment.model_validate(raw[-1]) if raw else None


def _link_capacities(inv: Inventory, store: Store, now: float) -> dict[str, float]:
    """The best bandwidth measured across each link by the newest assessments."""
    best: dict[str, float] = {}
    for raw in store.list_assessments(since=now - ASSESSMENT_MAX_AGE_S):
        a = Assessment.model_validate(raw)
        if a.link is None or a.link.source not in inv.hosts or a.link.dest not in inv.hosts:
            continue
        for name in (inv.host_links(a.link.source)[0], inv.host_links(a.link.dest)[1]):
            best[name] = max(best.get(name, 0.0), a.link.bandwidth)
    return best


async def current_fleet(inv: Inventory, store: Store, *, measure: bool = True) -> FleetView:
    """The fleet as it stands (see the module doc). :class:`ConfigError` for a link
    whose capacity is neither declared nor measured, or a VM in two ``apart``
    groups."""
    now = time.time()
    notes: list[str] = []
    usages = {u.host: u for u in await fleet_usage(inv, store, list(inv.hosts),
                                                   measure=measure)}
    measured_links = _link_capacities(inv, store, now)
    links: list[Link] = []
    unknown: list[str] = []
    for name in sorted(inv.link_names()):
        decl = inv.link(name)
        capacity: float | None = float(decl.capacity) if decl.capacity is not None else None
        if capacity is None and name in measured_links:
            capacity = measured_links[name]
            notes.append(f"link {name}: capacity {capacity * 8 / 1e6:.0f} Mbit/s as measured "
                         "by the newest assessments (not declared)")
        if capacity is None:
            unknown.append(name)
            continue
        links.append(Link(name=name, capacity=capacity, budget=decl.budget))
    if unknown:
        raise ConfigError(
            "the capacity of link(s) " + ", ".join(unknown) + " is not known: declare it "
            "([links.NAME] capacity = \"1gbit\") or measure it with 'vmigrate assess VM "
            "--to HOST' across it")
    hosts: list[Host] = []
    vms: list[Vm] = []
    config = planning_config(inv)
    for name, u in usages.items():
        cap = inv.host_capacity(name)
        up, down = inv.host_links(name)
        state: HostState = "active"
        if u.state.state in ("draining", "maintenance"):
            state = "maintenance" if u.state.state == "maintenance" else "draining"
        memory = u.memory
        if memory is None:
            notes.append(f"{name}: memory neither declared nor measured"
                         f"{' (' + u.error + ')' if u.error else ''}: taken as maintenance")
            state, memory = "maintenance", max(u.memory_used, 1)
        elif u.error:
            notes.append(f"{name}: not measured ({u.error}); declared figures used")
        hosts.append(Host(name=name, memory=memory, cpus=float(u.cpus or max(u.vcpus, 1)),
                          reserve_memory=min(u.reserve_memory, max(memory - 1, 0)),
                          state=state, uplink=up, downlink=down,
                          max_in=cap.max_migrations_in, max_out=cap.max_migrations_out,
                          labels=dict(inv.host(name).labels)))
        for vu in u.vms:
            if vu.incoming:
                continue  # counted on its source until its migration ends
            groups = groups_for(inv, vu.name)
            if len(groups.apart) > 1:
                raise ConfigError(
                    f"VM {vu.name} is in {len(groups.apart)} 'apart' groups "
                    f"({', '.join(groups.apart)}): the wave planner takes one per VM")
            a = _newest_assessment(store, vu.name, now)
            spec = VMSpec.model_validate_json(store.get_vm(vu.name).spec_json)
            if a is None:
                notes.append(f"{vu.name}: no assessment: taken as idle (run 'vmigrate "
                             "assess' for its dirty rate)")
            tier = tier_for(vu.name, config)
            vms.append(Vm(
                name=vu.name, host=name, memory=vu.memory, mode=_mode(inv, name, spec, a),
                cpus=vu.cpu if vu.cpu is not None else float(vu.vcpus),
                dirty_rate=a.dirty_rate if a is not None else 0.0,
                wss=float(a.dirty_set_bytes) if a is not None and a.dirty_set_bytes
                else float(vu.memory),
                disk_bytes=sum(d.allocated_bytes for d in a.disks) if a is not None
                else 0,
                group=groups.together, affinity=groups.together,
                anti_affinity=groups.apart[0] if groups.apart else None,
                tier=tier.name if tier is not None else None,
                postcopy=tier is None or tier.postcopy))
    return FleetView(Fleet(hosts=hosts, links=links, vms=vms), usages, notes)


def read_plan_file(path: Path) -> list[tuple[str, str | None]]:
    """A plan file's moves: ``[[move]] vm = "web1"``, ``to = "h2"`` (optional: placed by
    capacity). :class:`ConfigError` naming what is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the plan file {path}: {exc}") from exc
    unknown = set(data) - {"move"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                          "(a plan file holds [[move]] entries)")
    moves = data.get("move", [])
    if not isinstance(moves, list) or not moves:
        raise ConfigError(f"{path}: no [[move]] entries")
    out: list[tuple[str, str | None]] = []
    for i, m in enumerate(moves, 1):
        if not isinstance(m, dict) or set(m) - {"vm", "to"} or "vm" not in m:
            raise ConfigError(f"{path}: move {i}: expected vm = \"NAME\" and optionally "
                              "to = \"HOST\"")
        vm, to = m["vm"], m.get("to")
        if not isinstance(vm, str) or (to is not None and not isinstance(to, str)):
            raise ConfigError(f"{path}: move {i}: vm and to are names (text)")
        try:
            validate.check_name(vm, "VM name")
            if to is not None:
                validate.check_name(to, "host name")
        except ValueError as exc:
            raise ConfigError(f"{path}: move {i}: {exc}") from exc
        out.append((vm, to))
    return out


def _placed_moves(view: FleetView, asked: list[tuple[str, str | None]],
                  estimator: ModelEstimator) -> Placement:
    """The plan file's moves, those without a destination placed by capacity (as an
    evacuation of just those VMs would place them)."""
    fleet = view.fleet
    fixed: list[Move] = []
    free: list[str] = []
    seen: set[str] = set()
    for vm, to in asked:
        if vm in seen:
            raise UserError(f"the plan moves {vm} twice")
        seen.add(vm)
        v = fleet.vm(vm)
        if to is None:
            free.append(vm)
            continue
        fleet.host(to)
        if to == v.host:
            raise UserError(f"{vm} is already on {to}")
        fixed.append(Move(vm=vm, src=v.host, dst=to))
    why = {m.vm: f"the plan file sends it to {m.dst}" for m in fixed}
    moves: list[Move] = list(fixed)
    unplaceable: list[tuple[str, str]] = []
    # the VMs without a destination: placed by capacity, one source host at a time, as
    # an evacuation of just those VMs would place them
    after = fleet.after(fixed)
    for src in sorted({fleet.vm(vm).host for vm in free}):
        placed = plan_evacuation(after, src, estimator, only=free)
        moves += placed.moves
        unplaceable += placed.unplaceable
        why.update(placed.why)
        after = after.after(placed.moves)
    return Placement(moves=moves, unplaceable=unplaceable, why=why,
                     imbalance_before=0.0, imbalance_after=0.0,
                     summary=f"{len(moves)} move(s) from the plan file")


async def plan_wave(inv: Inventory, store: Store, *, evacuate: str | None = None,
                    rebalance: bool = False, plan_file: Path | None = None,
                    max_moves: int = 5, min_gain: float = 0.01, measure: bool = True,
                    strategy: Strategy = "vmigrate") -> WavePlan:
    """Plan a wave (exactly one of ``evacuate``, ``rebalance`` and ``plan_file``) on the
    fleet as it stands. Changes nothing."""
    if sum((evacuate is not None, rebalance, plan_file is not None)) != 1:
        raise UserError("give exactly one of: a plan file, --evacuate HOST, --rebalance")
    asked = read_plan_file(plan_file) if plan_file is not None else None
    if evacuate is not None:
        inv.host(evacuate)
    view = await current_fleet(inv, store, measure=measure)
    estimator = ModelEstimator(tiers={t.name: t for t in planning_config(inv).tiers})
    kind: WaveKind
    if evacuate is not None:
        kind, placement = "evacuate", plan_evacuation(view.fleet, evacuate, estimator)
    elif rebalance:
        kind = "rebalance"
        placement = plan_rebalance(view.fleet, estimator, max_moves=max_moves,
                                   min_gain=min_gain)
    else:
        assert asked is not None
        kind, placement = "plan", _placed_moves(view, asked, estimator)
    sched = schedule(view.fleet, placement.moves, estimator, strategy=strategy)
    return WavePlan(kind=kind, view=view, placement=placement, schedule=sched,
                    estimator=estimator, host=evacuate)
