"""The fleet as plain data: links, hosts, VMs, and the moves asked of them (pure).

Units: bytes, bytes/s, seconds. A :class:`Fleet` is checked when it is built (every
name unique, every link and host a VM or a host names exists, sizes positive) and
raises :class:`FleetError` otherwise; once built it holds. It does not check the
placement rules (capacity, affinity): a fleet may break them before a wave, and
:meth:`Fleet.violations` says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar, get_args

from vmigrate.errors import UserError

__all__ = [
    "HOST_STATES",
    "MODES",
    "Fleet",
    "FleetError",
    "GiB",
    "Host",
    "HostState",
    "Link",
    "Mode",
    "Move",
    "Vm",
    "fmt_rate",
    "fmt_size",
]

GiB = 1 << 30

HostState = Literal["active", "draining", "maintenance"]
HOST_STATES: tuple[HostState, ...] = get_args(HostState)
Mode = Literal["live", "online", "cold", "warm"]
MODES: tuple[Mode, ...] = get_args(Mode)


class FleetError(UserError):
    """The fleet, or the moves asked of it, are inconsistent (an unknown host or link, a
    VM moved twice, a group sent to two destinations ...); nothing was planned."""


def fmt_rate(rate: float) -> str:
    """``rate`` bytes/s as Mbit/s, the unit links are shaped and sold in."""
    mbit = rate * 8 / 1e6
    return f"{mbit:.0f} Mbit/s" if mbit >= 10 else f"{mbit:.1f} Mbit/s"


def fmt_size(n: float) -> str:
    """``n`` bytes in GiB (MiB below one GiB)."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def _positive(what: str, value: float, *, zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise FleetError(f"{what} must be {'0 or more' if zero else 'above 0'}, not {value}")


@dataclass(frozen=True)
class Link:
    """A network link migrations cross, one direction of it (a host's uplink or
    downlink, or a shared segment several hosts name)."""

    name: str
    #: what the link carries (bytes/s)
    capacity: float
    #: the share of ``capacity`` migrations may use (0 < budget <= 1)
    budget: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise FleetError("a link needs a name")
        _positive(f"link {self.name}: capacity", self.capacity)
        if not (0 < self.budget <= 1):
            raise FleetError(f"link {self.name}: budget must be above 0 and at most 1, "
                             f"not {self.budget}")

    @property
    def allowance(self) -> float:
        """What migrations may use of the link together (bytes/s)."""
        return self.capacity * self.budget


@dataclass(frozen=True)
class Host:
    """A hypervisor host. Only ``active`` hosts receive VMs; a ``draining`` host is
    being emptied; a host in ``maintenance`` receives nothing."""

    name: str
    #: physical memory (bytes)
    memory: int
    cpus: float
    #: memory kept for the host itself (bytes): VMs get ``memory - reserve_memory``
    reserve_memory: int = 0
    state: HostState = "active"
    #: the links its outgoing and incoming migrations cross ("" -> NAME-up, NAME-down)
    uplink: str = ""
    downlink: str = ""
    #: at most this many migrations into / out of the host at a time
    max_in: int = 2
    max_out: int = 2
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise FleetError("a host needs a name")
        if not self.uplink:
            object.__setattr__(self, "uplink", f"{self.name}-up")
        if not self.downlink:
            object.__setattr__(self, "downlink", f"{self.name}-down")
        _positive(f"host {self.name}: memory", self.memory)
        _positive(f"host {self.name}: cpus", self.cpus)
        _positive(f"host {self.name}: reserve_memory", self.reserve_memory, zero=True)
        if self.reserve_memory >= self.memory:
            raise FleetError(f"host {self.name}: reserve_memory ({fmt_size(self.reserve_memory)})"
                             f" leaves nothing of its {fmt_size(self.memory)} to VMs")
        if self.state not in HOST_STATES:
            raise FleetError(f"host {self.name}: state {self.state!r} is not one of "
                             f"{', '.join(HOST_STATES)}")
        if self.max_in < 1 or self.max_out < 1:
            raise FleetError(f"host {self.name}: max_in and max_out must be 1 or more")

    @property
    def capacity(self) -> int:
        """The memory VMs may use on the host (bytes)."""
        return self.memory - self.reserve_memory


@dataclass(frozen=True)
class Vm:
    """A VM where it runs now, and what moving it involves."""

    name: str
    host: str
    #: memory it holds on its host (bytes)
    memory: int
    #: CPUs it uses (for balance; CPUs are not a placement limit)
    cpus: float = 1.0
    #: what the guest dirties (bytes/s) and the most it keeps dirty (bytes; 0: all of memory)
    dirty_rate: float = 0.0
    wss: float = 0.0
    #: local disk bytes that cross the link (online, cold, warm)
    disk_bytes: int = 0
    mode: Mode = "live"
    #: members move together: the same destination, started together
    group: str | None = None
    #: the same key: must share a host
    affinity: str | None = None
    #: the same key: never share a host
    anti_affinity: str | None = None
    tier: str | None = None
    #: the tier allows post-copy
    postcopy: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise FleetError("a VM needs a name")
        _positive(f"VM {self.name}: memory", self.memory)
        _positive(f"VM {self.name}: cpus", self.cpus, zero=True)
        _positive(f"VM {self.name}: dirty_rate", self.dirty_rate, zero=True)
        _positive(f"VM {self.name}: wss", self.wss, zero=True)
        _positive(f"VM {self.name}: disk_bytes", self.disk_bytes, zero=True)
        if self.mode not in MODES:
            raise FleetError(f"VM {self.name}: mode {self.mode!r} is not one of "
                             f"{', '.join(MODES)}")

    @property
    def working_set(self) -> float:
        """What the guest keeps dirty (bytes): ``wss``, else all of its memory."""
        return min(float(self.memory), self.wss) if self.wss > 0 else float(self.memory)


@dataclass(frozen=True)
class Move:
    """One VM to move from ``src`` to ``dst``."""

    vm: str
    src: str
    dst: str


@dataclass(frozen=True)
class Fleet:
    """Hosts, links and VMs; checked when built (see the module doc)."""

    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    vms: tuple[Vm, ...]
    _hosts: dict[str, Host] = field(init=False, repr=False, compare=False, hash=False)
    _links: dict[str, Link] = field(init=False, repr=False, compare=False, hash=False)
    _vms: dict[str, Vm] = field(init=False, repr=False, compare=False, hash=False)

    def __init__(self, hosts: Iterable[Host], links: Iterable[Link], vms: Iterable[Vm]
                 ) -> None:
        object.__setattr__(self, "hosts", tuple(hosts))
        object.__setattr__(self, "links", tuple(links))
        object.__setattr__(self, "vms", tuple(vms))
        object.__setattr__(self, "_hosts", _index("host", self.hosts))
        object.__setattr__(self, "_links", _index("link", self.links))
        object.__setattr__(self, "_vms", _index("VM", self.vms))
        for h in self.hosts:
            for link in (h.uplink, h.downlink):
                if link not in self._links:
                    raise FleetError(f"host {h.name} names link {link!r}, which is not in "
                                     f"the fleet (links: {', '.join(sorted(self._links))})")
        for vm in self.vms:
            if vm.host not in self._hosts:
                raise FleetError(f"VM {vm.name} runs on host {vm.host!r}, which is not in "
                                 "the fleet")

    # -- lookups

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise FleetError(f"no host {name!r} in the fleet") from None

    def link(self, name: str) -> Link:
        try:
            return self._links[name]
        except KeyError:
            raise FleetError(f"no link {name!r} in the fleet") from None

    def vm(self, name: str) -> Vm:
        try:
            return self._vms[name]
        except KeyError:
            raise FleetError(f"no VM {name!r} in the fleet") from None

    def vms_on(self, host: str) -> list[Vm]:
        """The VMs on ``host``, by name."""
        return sorted((v for v in self.vms if v.host == host), key=lambda v: v.name)

    def active(self) -> list[Host]:
        """The hosts that may receive VMs, by name."""
        return sorted((h for h in self.hosts if h.state == "active"), key=lambda h: h.name)

    def used_memory(self, host: str) -> int:
        return sum(v.memory for v in self.vms if v.host == host)

    def used_cpus(self, host: str) -> float:
        return sum(v.cpus for v in self.vms if v.host == host)

    def lane(self, src: str, dst: str) -> float:
        """What one migration from ``src`` to ``dst`` may use alone: the lesser of the
        two links' allowances (bytes/s)."""
        return min(self.link(self.host(src).uplink).allowance,
                   self.link(self.host(dst).downlink).allowance)

    def links_of(self, src: str, dst: str) -> tuple[str, ...]:
        """The links a migration from ``src`` to ``dst`` crosses (one when the source's
        uplink is the destination's downlink)."""
        up, down = self.host(src).uplink, self.host(dst).downlink
        return (up,) if up == down else (up, down)

    def after(self, moves: Iterable[Move]) -> Fleet:
        """The fleet once ``moves`` are done."""
        where = {m.vm: m.dst for m in moves}
        for name in where:
            self.vm(name)
        vms = [v if v.name not in where else _moved(v, where[v.name]) for v in self.vms]
        return Fleet(self.hosts, self.links, vms)

    def violations(self) -> list[str]:
        """The placement rules the fleet breaks as it stands: hosts over capacity, VMs
        sharing a host against their anti-affinity, affinity keys split over hosts."""
        out: list[str] = []
        for h in sorted(self.hosts, key=lambda h: h.name):
            used = self.used_memory(h.name)
            if used > h.capacity:
                out.append(f"{h.name} holds {fmt_size(used)} of VMs, more than its "
                           f"{fmt_size(h.capacity)}")
        for key, members in sorted(_keyed(self.vms, "anti_affinity").items()):
            hosts: dict[str, list[str]] = {}
            for v in members:
                hosts.setdefault(v.host, []).append(v.name)
            for host, names in sorted(hosts.items()):
                if len(names) > 1:
                    out.append(f"anti-affinity {key!r}: {', '.join(names)} share {host}")
        for key, members in sorted(_keyed(self.vms, "affinity").items()):
            spread = sorted({v.host for v in members})
            if len(spread) > 1:
                out.append(f"affinity {key!r}: its VMs are on {', '.join(spread)}")
        return out


def _moved(vm: Vm, host: str) -> Vm:
    return replace(vm, host=host)


_Named = TypeVar("_Named", Host, Link, Vm)


def _index(what: str, items: Sequence[_Named]) -> dict[str, _Named]:
    out: dict[str, _Named] = {}
    for item in items:
        if item.name in out:
            raise FleetError(f"two {what}s are named {item.name!r}")
        out[item.name] = item
    return out


def _keyed(vms: Iterable[Vm], attr: Literal["group", "affinity", "anti_affinity"]
           ) -> dict[str, list[Vm]]:
    out: dict[str, list[Vm]] = {}
    for v in vms:
        key = getattr(v, attr)
        if key is not None:
            out.setdefault(key, []).append(v)
    return out


def units(vms: Iterable[Vm]) -> list[list[Vm]]:
    """``vms`` split into the sets that must move together: VMs sharing a group or an
    affinity key, transitively; each set sorted by name, the sets by their first name."""
    items = sorted(vms, key=lambda v: v.name)
    parent = {v.name: v.name for v in items}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for attr in ("group", "affinity"):
        first: dict[str, str] = {}
        for v in items:
            key = getattr(v, attr)
            if key is None:
                continue
            if key in first:
                parent[root(v.name)] = root(first[key])
            else:
                first[key] = v.name
    out: dict[str, list[Vm]] = {}
    for v in items:
        out.setdefault(root(v.name), []).append(v)
    return sorted(out.values(), key=lambda u: u[0].name)
