"""Faults and measurements on the links of a lab that is up.

:func:`lab_up <vmigrate.lab.net.lab_up>` shapes every host's migration link
(``tc tbf`` on both ends of its veth, at the lab's rate). While the lab runs,
tests and benchmarks change those links here: :func:`set_link_rate` reshapes
one, :func:`link_down` cuts it (both ends administratively down) and
:func:`link_up` restores it; :func:`vm_link_down` / :func:`vm_link_up` do the same
to a host's uplink to the VM network (its guests fall silent outside the host);
:func:`link_bytes` reads what crossed it, as the kernel counts it, and
:func:`host_netns` names a host's namespace (to run a command on the host's side).

Every function takes the lab's home and, optionally, its name (default: the lab
of ``<home>/vmigrate.toml``, else the only lab in ``<home>/labs``), and raises
:class:`~vmigrate.errors.NotFoundError` when there is no such lab or host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from vmigrate.errors import LabError
from vmigrate.lab import _sys
from vmigrate.lab._plan import parse_rate
from vmigrate.lab._state import STATE_NAME, write_state
from vmigrate.lab.net import find_host, lab_dir, require_root, shape_link

__all__ = [
    "host_netns",
    "link_bytes",
    "link_down",
    "link_up",
    "set_link_rate",
    "vm_link_down",
    "vm_link_up",
]


def set_link_rate(home: Path, host: str, rate: str, name: str | None = None) -> None:
    """Reshape both ends of ``host``'s migration link to ``rate`` (tc syntax)."""
    parse_rate(rate)
    require_root()
    state, plan, hp = find_host(home, host, name)
    shape_link(plan, hp.host, rate)
    state.rates[hp.host] = rate
    write_state(lab_dir(home, state.name) / STATE_NAME, state)


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
    counts them (IP and TCP headers included): an independent wire measurement."""
    _state, _plan, hp = find_host(home, host, name)
    base = Path("/sys/class/net") / hp.mig_if / "statistics"
    res = subprocess.run(["ip", "netns", "exec", hp.netns, "cat", "--", str(base / "rx_bytes"),
                          str(base / "tx_bytes")],
                         capture_output=True, text=True, check=False)
    fields = res.stdout.split()
    if res.returncode != 0 or len(fields) != 2:
        raise LabError(f"cannot read {hp.mig_if} counters in {hp.netns}: {res.stderr.strip()}")
    return int(fields[0]), int(fields[1])


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
