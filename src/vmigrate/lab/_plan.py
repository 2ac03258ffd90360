"""Pure lab planning: names, addresses, rates, the lab index. No I/O here.

Address plan for lab index ``N`` (1..200) and host ``hI`` (I = 1..8):

=============  ==================  ===========================================
network        subnet              addresses
=============  ==================  ===========================================
management     10.240.N.0/24       controller bridge .1, host hI .(10+I)
migration      10.241.N.0/24       host hI .(10+I)
VM (layer 2)   10.242.N.0/24       probe .254, guests .100+ (allocated elsewhere)
=============  ==================  ===========================================

Name plan for lab ``<n>`` (``[a-z][a-z0-9]{0,5}``, so every name fits the
15-character limit of Linux interface names):

* namespaces: ``<n>-hI`` (hosts), ``<n>-sw`` (switch), ``<n>-probe``;
* root namespace: bridge ``<n>-mgmt``, veth ends ``<n>-mI``;
* host namespace ``<n>-hI``: ``<n>-hIm`` (management), ``<n>-hIg`` (migration),
  ``<n>-hIv`` (VM uplink, port of ``brvm``), bridge ``brvm``;
* switch namespace: bridges ``<n>-swg`` (migration) and ``<n>-swv`` (VM),
  ports ``<n>-sIg``, ``<n>-sIv`` and ``<n>-sp`` (probe);
* probe namespace: ``<n>-pv``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from vmigrate import units
from vmigrate.errors import LabError, SpecError

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,5}")
MAX_HOSTS = 8
MAX_INDEX = 200
IFNAMSIZ = 15
VM_BRIDGE = "brvm"

#: the slowest link the lab shapes, bits/s
MIN_RATE_BITS = 8000

#: A direction of a host's migration link: ``up`` is host -> switch (shaped on the
#: host's end of the veth), ``down`` is switch -> host (shaped on the switch's end).
Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid lab name, else raise :class:`SpecError`."""
    if not NAME_RE.fullmatch(name):
        raise SpecError(
            f"invalid lab name {name!r}: use 1 to 6 characters, a lowercase letter "
            "then lowercase letters or digits (interface names are limited to 15 characters)"
        )
    return name


def validate_hosts(hosts: int) -> int:
    """Return ``hosts`` if it is in 1..8, else raise :class:`SpecError`."""
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
        raise SpecError(f"invalid host count {hosts!r}: the lab has 1 to {MAX_HOSTS} hosts")
    return hosts


def parse_rate(rate: str) -> int:
    """A ``tc`` rate (``200mbit``, ``1gbit``, ``10MBps``) in bits per second
    (:func:`vmigrate.units.parse_tc_rate`), at least 8kbit.

    Raises :class:`SpecError` for anything else (a bare number is refused: its
    unit is ambiguous)."""
    bits = units.parse_tc_rate(rate, what="link rate") * 8
    if bits < MIN_RATE_BITS:
        raise SpecError(f"invalid link rate {rate!r}: at least 8kbit")
    return int(bits)


def host_names(hosts: int) -> list[str]:
    """The host names of a lab of ``hosts`` hosts: ``h1`` .. ``hN``."""
    return [f"h{i}" for i in range(1, validate_hosts(hosts) + 1)]


def validate_link_rates(rates: Mapping[str, str], hosts: int, what: str) -> dict[str, str]:
    """``rates`` (host -> tc rate) as a dict, if every host is one of the lab's
    (``h1`` .. ``hN``) and every rate is valid; else :class:`SpecError` naming ``what``
    (e.g. ``uplink``)."""
    if not isinstance(rates, Mapping):
        raise SpecError(f"invalid {what} rates {rates!r}: expected host -> rate")
    known = host_names(hosts)
    for host, rate in rates.items():
        if host not in known:
            raise SpecError(
                f"invalid {what} for host {host!r}: the lab's hosts are {', '.join(known)}"
            )
        if not isinstance(rate, str):
            raise SpecError(f"invalid {what} rate {rate!r} for {host}: expected tc syntax")
        parse_rate(rate)
    return dict(rates)


def parse_host_rates(items: Iterable[str], what: str) -> dict[str, str]:
    """``["h1=1gbit", "h2=200mbit"]`` (command-line form) as ``{"h1": "1gbit", ...}``.

    Checks the form and the rates, not that the hosts exist (the lab's size decides:
    :func:`validate_link_rates`). Raises :class:`SpecError` naming ``what`` for a
    missing ``=``, an invalid host name or rate, or a host given twice."""
    rates: dict[str, str] = {}
    for item in items:
        host, sep, rate = item.partition("=")
        host, rate = host.strip(), rate.strip()
        if not sep or not host or not rate:
            raise SpecError(f"invalid {what} {item!r}: use HOST=RATE, e.g. h2=200mbit")
        if not re.fullmatch(r"h[1-9][0-9]*", host):
            raise SpecError(f"invalid {what} {item!r}: lab hosts are named h1, h2, ...")
        if host in rates:
            raise SpecError(f"{what} for {host} given twice ({rates[host]}, {rate})")
        try:
            parse_rate(rate)
        except SpecError as exc:
            raise SpecError(f"invalid {what} {item!r}: {exc}") from None
        rates[host] = rate
    return rates


def tbf_params(rate: str) -> tuple[int, str]:
    """``(burst_bytes, latency)`` for a ``tc tbf`` qdisc at ``rate``.

    The burst holds 4 ms at full rate (the kernel refills the bucket at least
    every tick, 4 ms at HZ=250), never less than 64 KiB so one TSO/GSO
    super-packet fits; the latency bounds the queue at 50 ms."""
    bytes_per_s = parse_rate(rate) / 8
    return max(int(bytes_per_s * 0.004), 64 * 1024), "50ms"


@dataclass(frozen=True)
class HostPlan:
    """Names and addresses of one lab host."""

    host: str
    netns: str
    mgmt_root: str
    mgmt_if: str
    mgmt_address: str
    mig_if: str
    mig_switch_if: str
    migration_address: str
    vm_if: str
    vm_switch_if: str


@dataclass(frozen=True)
class LabPlan:
    """Every name and address of a lab, derived from its name, index and size."""

    name: str
    index: int
    hosts: tuple[HostPlan, ...]
    switch_netns: str
    probe_netns: str
    mgmt_bridge: str
    mgmt_gateway: str
    switch_mig_bridge: str
    switch_vm_bridge: str
    probe_switch_if: str
    probe_if: str
    probe_address: str
    mgmt_network: str
    migration_network: str
    vm_network: str

    def host(self, host: str) -> HostPlan:
        for hp in self.hosts:
            if hp.host == host:
                return hp
        raise KeyError(host)

    def interface_names(self) -> list[str]:
        """Every interface name of the lab (``brvm`` once, though each host has one)."""
        names = [self.mgmt_bridge, self.switch_mig_bridge, self.switch_vm_bridge,
                 self.probe_switch_if, self.probe_if, VM_BRIDGE]
        for hp in self.hosts:
            names += [hp.mgmt_root, hp.mgmt_if, hp.mig_if, hp.mig_switch_if,
                      hp.vm_if, hp.vm_switch_if]
        return names


def lab_networks(index: int) -> tuple[ipaddress.IPv4Network, ...]:
    """The management, migration and VM subnets of lab index ``index``."""
    if not 1 <= index <= MAX_INDEX:
        raise ValueError(f"lab index {index} outside 1..{MAX_INDEX}")
    return tuple(ipaddress.IPv4Network(f"10.{second}.{index}.0/24") for second in (240, 241, 242))


def make_plan(name: str, index: int, hosts: int) -> LabPlan:
    """The full name and address plan; validates its inputs (:class:`SpecError`)."""
    validate_name(name)
    validate_hosts(hosts)
    mgmt, mig, vm = lab_networks(index)
    host_plans = tuple(
        HostPlan(
            host=f"h{i}",
            netns=f"{name}-h{i}",
            mgmt_root=f"{name}-m{i}",
            mgmt_if=f"{name}-h{i}m",
            mgmt_address=str(mgmt.network_address + 10 + i),
            mig_if=f"{name}-h{i}g",
            mig_switch_if=f"{name}-s{i}g",
            migration_address=str(mig.network_address + 10 + i),
            vm_if=f"{name}-h{i}v",
            vm_switch_if=f"{name}-s{i}v",
        )
        for i in range(1, hosts + 1)
    )
    plan = LabPlan(
        name=name,
        index=index,
        hosts=host_plans,
        switch_netns=f"{name}-sw",
        probe_netns=f"{name}-probe",
        mgmt_bridge=f"{name}-mgmt",
        mgmt_gateway=str(mgmt.network_address + 1),
        switch_mig_bridge=f"{name}-swg",
        switch_vm_bridge=f"{name}-swv",
        probe_switch_if=f"{name}-sp",
        probe_if=f"{name}-pv",
        probe_address=str(vm.network_address + 254),
        mgmt_network=str(mgmt),
        migration_network=str(mig),
        vm_network=str(vm),
    )
    too_long = [n for n in plan.interface_names() if len(n) > IFNAMSIZ]
    assert not too_long, too_long  # guaranteed by the name rule
    return plan


def pick_index(
    used: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
    taken: Iterable[int] = (),
) -> int:
    """The lowest lab index whose three subnets overlap none of ``used`` and
    which is not in ``taken`` (indexes recorded by other labs' state files).

    Raises :class:`LabError` when all 200 are in use."""
    used_v4 = [n for n in used if isinstance(n, ipaddress.IPv4Network)]
    taken_set = set(taken)
    for index in range(1, MAX_INDEX + 1):
        if index in taken_set:
            continue
        if any(net.overlaps(u) for net in lab_networks(index) for u in used_v4):
            continue
        return index
    raise LabError(
        f"no free lab index: every 10.240-242.N.0/24 (N=1..{MAX_INDEX}) overlaps a network "
        "in use on this machine or another lab"
    )
