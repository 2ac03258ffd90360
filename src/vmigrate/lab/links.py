"""Faults and measurements on the links of a lab that is up.

:func:`lab_up <vmigrate.lab.net.lab_up>` shapes every host's migration link
(``tc tbf`` on both ends of its veth, at the lab's rate). While the lab runs,
tests and benchmarks change those links here: :func:`set_link_rate` reshapes
one (both directions, or only its uplink, host -> switch, or its downlink,
switch -> host), :func:`lab_link_rates` says what each is shaped to,
:func:`link_down` cuts it (both ends administratively down) and
:func:`link_up` restores it; :func:`vm_link_down` / :func:`vm_link_up` do the same
to a host's uplink to the VM network (its guests fall silent outside the host);
:func:`link_bytes` reads what crossed it, as the kernel counts it, and
:func:`host_netns` names a host's namespace (to run a command on the host's side).

Every function takes the lab's home and, optionally, its name (default: the lab
of ``<home>/vmigrate.toml``, else the only lab in ``<home>/labs``), and raises
:class:`~vmigrate.errors.NotFoundError` when there is no such lab or host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vmigrate.config import CONFIG_NAME, LinkConfig, dump_inventory, load_inventory
from vmigrate.errors import SpecError
from vmigrate.lab import _sys
from vmigrate.lab._netdev import NetDevFile
from vmigrate.lab._plan import Direction, parse_rate
from vmigrate.lab._state import STATE_NAME, atomic_write, write_state
from vmigrate.lab.net import LAB_LINK_BUDGET, find_host, find_lab, lab_dir, require_root, shape_link

__all__ = [
    "LinkDirection",
    "host_netns",
    "lab_link_rates",
    "link_bytes",
    "link_down",
    "link_up",
    "set_link_rate",
    "vm_link_down",
    "vm_link_up",
]

#: Which way of a host's migration link: ``up`` host -> switch, ``down`` switch ->
#: host, ``both``.
LinkDirection = Literal["both", "up", "down"]
_DIRECTIONS: dict[str, tuple[Direction, ...]] = {
    "both": ("up", "down"), "up": ("up",), "down": ("down",)}


def set_link_rate(home: Path, host: str, rate: str, name: str | None = None,
                  direction: LinkDirection = "both") -> None:
    """Reshape ``host``'s migration link to ``rate`` (tc syntax) in ``direction``:
    ``up`` (host -> switch: tbf on the host's end of the veth), ``down`` (switch ->
    host: the switch's end) or ``both``; record it in the lab state.

    Raises :class:`SpecError` for a bad rate or direction (nothing changed),
    :class:`LabError` when ``tc`` fails (the state then still holds the old rate; the
    first direction may be reshaped already)."""
    parse_rate(rate)
    if direction not in _DIRECTIONS:
        raise SpecError(f"invalid link direction {direction!r}: use up, down or both")
    require_root()
    state, plan, hp = find_host(home, host, name)
    shape_link(plan, hp.host, rate, _DIRECTIONS[direction])
    if direction in ("both", "up"):
        state.uplinks[hp.host] = rate
    if direction in ("both", "down"):
        state.downlinks[hp.host] = rate
    write_state(lab_dir(home, state.name) / STATE_NAME, state)
    _update_inventory_links(home, state.name, hp.host, rate, direction)


def _update_inventory_links(home: Path, lab: str, host: str, rate: str,
                            direction: LinkDirection) -> None:
    """Keep the lab inventory's ``[links."<host>-up"]`` / ``-down`` capacity equal to
    what the link is shaped at (the wave planner reads it); budgets are kept."""
    path = home / CONFIG_NAME
    if not path.exists():
        return
    inv = load_inventory(path)
    if inv.lab is None or inv.lab.name != lab:
        return
    links = dict(inv.links)
    names = [f"{host}-{d}" for d in ("up", "down") if direction in ("both", d)]
    for link in names:
        old = links.get(link)
        links[link] = LinkConfig(capacity=f"{parse_rate(rate)}bit",
                                 budget=old.budget if old is not None else LAB_LINK_BUDGET)
    atomic_write(path, dump_inventory(inv.model_copy(update={"links": links})))


def lab_link_rates(home: Path, name: str | None = None) -> dict[str, tuple[float, float]]:
    """host -> (uplink, downlink) rate in bytes per second, as recorded in the lab
    state (what :func:`~vmigrate.lab.net.lab_up` and :func:`set_link_rate` shaped).
    Needs no root. The uplink carries the host's sends (host -> switch), the
    downlink what it receives."""
    state, plan = find_lab(home, name)
    rates = {}
    for hp in plan.hosts:
        up, down = state.link_rates(hp.host)
        rates[hp.host] = (parse_rate(up) / 8, parse_rate(down) / 8)
    return rates


def link_down(home: Path, host: str, name: str | None = None) -> None:
    """Cut ``host``'s migration link: both veth ends administratively down."""
    _set_link(home, host, name, "down")


def link_up(home: Path, host: str, name: str | None = None) -> None:
    """Restore ``host``'s migration link (addresses, routes and shaping persist)."""
    _set_link(home, host, name, "up")


def vm_link_down(home: Path, host: str, name: str | None = None) -> None:
    """Cut ``host``'s uplink to the VM network (layer 2): its guests no longer answer
    anyone outside the host, the probe namespace included."""
    _set_vm_link(home, host, name, "down")


def vm_link_up(home: Path, host: str, name: str | None = None) -> None:
    """Restore ``host``'s uplink to the VM network."""
    _set_vm_link(home, host, name, "up")


def link_bytes(home: Path, host: str, name: str | None = None) -> tuple[int, int]:
    """(received, sent) bytes so far on ``host``'s migration interface, as the kernel
    counts them (Ethernet, IP and TCP headers included): an independent wire
    measurement. Needs root; raises :class:`LabError` when they cannot be read.
    (:class:`~vmigrate.lab.traffic.LinkSampler` samples them over time.)"""
    _state, _plan, hp = find_host(home, host, name)
    with NetDevFile(hp.netns) as counters:
        return counters.counters(hp.mig_if)


def host_netns(home: Path, host: str, name: str | None = None) -> str:
    """The network namespace of lab host ``host`` (e.g. ``vml-h1``)."""
    return find_host(home, host, name)[2].netns


def _set_link(home: Path, host: str, name: str | None, updown: str) -> None:
    require_root()
    _state, plan, hp = find_host(home, host, name)
    _sys.ip("link", "set", "dev", hp.mig_if, updown, netns=hp.netns)
    _sys.ip("link", "set", "dev", hp.mig_switch_if, updown, netns=plan.switch_netns)


def _set_vm_link(home: Path, host: str, name: str | None, updown: str) -> None:
    require_root()
    _state, plan, hp = find_host(home, host, name)
    _sys.ip("link", "set", "dev", hp.vm_if, updown, netns=hp.netns)
    _sys.ip("link", "set", "dev", hp.vm_switch_if, updown, netns=plan.switch_netns)
