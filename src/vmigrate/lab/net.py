"""The lab datacenter's network: building it, its status, tearing it down.

``lab_up`` builds, on this machine and as root (see :mod:`vmigrate.lab._plan`
for every name and address)::

    controller (root ns)                  switch ns <n>-sw
    bridge <n>-mgmt 10.240.N.1 ──veth──┐   bridge <n>-swg (migration, tbf on both ends)
                                       │   bridge <n>-swv (VM layer 2) ── probe ns <n>-probe
    host ns <n>-hI:  <n>-hIm 10.240.N.(10+I)   sshd listens here       10.242.N.254
                     <n>-hIg 10.241.N.(10+I) ──veth── <n>-sIg in <n>-swg
                     brvm ── <n>-hIv ──veth── <n>-sIv in <n>-swv

and writes the inventory ``<home>/vmigrate.toml`` with a ``[lab]`` section, and
each host's TLS migration credentials (from the lab CA in ``<lab dir>/pki``) into
its ``tls_path``.
Every resource is recorded in ``<home>/labs/<n>/state.json`` before it is
created (:mod:`vmigrate.lab._state`); ``lab_down`` removes exactly those.

After a failure: ``lab_up`` has removed what it made and re-raised (with a
note listing any cleanup step that failed); ``lab_down`` has run every step
and raises :class:`LabError` listing the failed ones, keeping the state file so
that it can be run again.

The links of a lab that is up are changed (rate, cut, restore) and measured by
:mod:`vmigrate.lab.links`, through :func:`find_host` and :func:`shape_link`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmigrate import pki
from vmigrate.config import (
    CONFIG_NAME,
    HostConfig,
    Inventory,
    LabConfig,
    LinkConfig,
    dump_inventory,
    load_inventory,
    parse_inventory,
)
from vmigrate.errors import (
    ConfigError,
    ConflictError,
    EnvironmentError_,
    LabError,
    NotFoundError,
    UserError,
)
from vmigrate.lab import _sshd, _sys
from vmigrate.lab._plan import (
    VM_BRIDGE,
    Direction,
    HostPlan,
    LabPlan,
    make_plan,
    parse_rate,
    pick_index,
    tbf_params,
    validate_hosts,
    validate_link_rates,
    validate_name,
)
from vmigrate.lab._state import (
    STATE_NAME,
    LabState,
    Resource,
    atomic_write,
    read_state,
    write_state,
)
from vmigrate.progress import ProgressFn, Say, sayer

__all__ = [
    "HostStatus",
    "LabSpec",
    "LabStatus",
    "find_host",
    "find_lab",
    "lab_dir",
    "lab_down",
    "lab_status",
    "lab_up",
    "require_root",
    "shape_link",
]


#: Serialises index allocation and building between concurrent ``lab up`` runs
#: (any VMIGRATE_HOME): the subnets are a machine-wide resource.
LOCK_PATH = Path("/run/lock/vmigrate-lab.lock")
_TOOLS = ("ip", "tc", "ssh-keygen")


#: the share of each lab link's rate a wave's migrations may use ([links.X] budget)
LAB_LINK_BUDGET = 0.8

@dataclass(frozen=True)
class LabSpec:
    """What to build. ``name``: 1-6 of ``[a-z][a-z0-9]*`` (interface names are
    limited to 15 characters); ``hosts``: 1..8; ``link_rate``: tc rate syntax, every
    host's migration link in both directions unless overridden per host:
    ``uplinks`` (host -> switch) and ``downlinks`` (switch -> host) map host names
    (``h1`` .. ``hN``) to tc rates."""

    name: str = "vml"
    hosts: int = 2
    link_rate: str = "1gbit"
    uplinks: Mapping[str, str] = field(default_factory=dict)
    downlinks: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`vmigrate.errors.SpecError` if any field is invalid (an
        override naming a host the lab does not have included)."""
        validate_name(self.name)
        validate_hosts(self.hosts)
        parse_rate(self.link_rate)
        validate_link_rates(self.uplinks, self.hosts, "uplink")
        validate_link_rates(self.downlinks, self.hosts, "downlink")

    def link_rates(self) -> dict[str, tuple[str, str]]:
        """host -> (uplink, downlink) rate, tc syntax, overrides applied."""
        return {
            f"h{i}": (self.uplinks.get(f"h{i}", self.link_rate),
                      self.downlinks.get(f"h{i}", self.link_rate))
            for i in range(1, self.hosts + 1)
        }


@dataclass(frozen=True)
class HostStatus:
    """One lab host as found on the machine now."""

    host: str
    netns: str
    netns_present: bool
    sshd_pid: int | None
    sshd_alive: bool
    mgmt_address: str
    migration_address: str
    # the rates tc reports now, None if unknown (no root, no qdisc): uplink on the
    # host's end of the migration veth (host -> switch), downlink on the switch's end
    uplink_rate: str | None
    downlink_rate: str | None
    link_up: bool  # both ends of the migration veth administratively up
    qemu_pids: tuple[int, ...]


@dataclass(frozen=True)
class LabStatus:
    """The lab as found on the machine now (``lab_status``)."""

    name: str
    index: int
    dir: Path
    phase: str
    link_rate: str  # the lab's default rate (hosts may override it per direction)
    vm_network: str
    probe_netns: str
    probe_address: str
    switch_present: bool
    probe_present: bool
    hosts: tuple[HostStatus, ...]

    @property
    def healthy(self) -> bool:
        return (
            self.phase == "up"
            and self.switch_present
            and self.probe_present
            and all(h.netns_present and h.sshd_alive and h.link_up for h in self.hosts)
        )


# -- public API ----------------------------------------------------------------


def require_root() -> None:
    """Raise :class:`EnvironmentError_` unless running as root."""
    if os.geteuid() != 0:
        raise EnvironmentError_(
            "the lab needs root: it creates network namespaces, bridges and veth links "
            "and starts sshd; run 'sudo vmigrate lab ...'"
        )


def lab_dir(home: Path, name: str) -> Path:
    """``<home>/labs/<name>``: the lab's state, keys, host directories and pools."""
    return _abs(home) / "labs" / validate_name(name)


def lab_up(spec: LabSpec, home: Path, *, progress: ProgressFn | None = None) -> Inventory:
    """Build the lab described by ``spec`` and write ``<home>/vmigrate.toml``.

    Returns the inventory as written (``path`` set). Raises
    :class:`SpecError` (bad spec), :class:`EnvironmentError_` (not root, missing
    tool), :class:`StateError` (user inventory present, lab already up, names
    taken), :class:`LabError` (a step failed). On failure nothing the call
    created remains, unless a cleanup step failed too (see the exception notes).
    ``progress`` is told each step as an :class:`~vmigrate.progress.Event` with a
    ``message``.
    """
    spec.validate()
    require_root()
    _check_tools()
    home = _abs(home)
    say = sayer(progress)
    started = time.monotonic()
    with _machine_lock():
        _refuse_if_taken(home, spec.name)
        index = pick_index(_sys.networks_in_use(), _indexes_of_labs(home))
        plan = make_plan(spec.name, index, spec.hosts)
        labdir = lab_dir(home, spec.name)
        rates = spec.link_rates()
        state = LabState(
            name=spec.name, index=index, hosts=spec.hosts, link_rate=spec.link_rate,
            created=time.time(), uplinks={h: up for h, (up, _down) in rates.items()},
            downlinks={h: down for h, (_up, down) in rates.items()},
            resources=[Resource("dir", path=str(labdir))],
        )
        try:
            labdir.mkdir(parents=True)
        except OSError as exc:
            raise LabError(f"cannot create the lab directory {labdir}: {exc}") from exc
        try:
            write_state(labdir / STATE_NAME, state)
        except BaseException:
            shutil.rmtree(labdir, ignore_errors=True)
            raise
        say(f"lab {spec.name}: index {index}, management {plan.mgmt_network}, "
            f"migration {plan.migration_network}, VM network {plan.vm_network}")
        try:
            try:
                inventory = _Builder(home, plan, state, say).build()
            except OSError as exc:
                raise LabError(f"lab up: {exc}") from exc
        except BaseException as exc:
            say(f"lab up failed ({exc!r}); removing what was created")
            _removed, failures = _teardown(home, state, say)
            if failures:
                exc.add_note("lab cleanup failed too: " + "; ".join(failures))
            raise
    say(f"lab {spec.name} up in {time.monotonic() - started:.2f} s")
    return inventory


def lab_down(
    home: Path, name: str | None = None, *, progress: ProgressFn | None = None
) -> list[str]:
    """Stop the lab's QEMU processes (verified pidfiles in the hosts' data
    directories), its sshds and any other process left in its namespaces; delete
    its namespaces, its root-namespace links (and any other root interface named
    ``<name>-*``, e.g. a tap), its inventory and directory. Returns what was
    removed; ``[]`` if there was no lab.

    ``name`` None: the lab of ``<home>/vmigrate.toml``, else the only lab in
    ``<home>/labs``. Every step runs even if an earlier one failed; then
    :class:`LabError` lists the failures and the state file is kept for a rerun.
    A state file of an unknown version raises :class:`LabError` before anything
    is touched. ``progress`` is told each step as an Event with a ``message``.
    """
    require_root()
    home = _abs(home)
    say = sayer(progress)
    resolved = _resolve_name(home, name)
    if resolved is None:
        return []
    labdir = lab_dir(home, resolved)
    try:
        state = read_state(labdir / STATE_NAME)
    except FileNotFoundError:
        # Nothing was recorded (or a crash before the first state write).
        removed: list[str] = []
        inv = _remove_lab_inventory(home, resolved, labdir)
        if inv:
            removed.append(inv)
        if labdir.exists():
            shutil.rmtree(labdir)
            removed.append(f"directory {labdir}")
        return removed
    started = time.monotonic()
    removed, failures = _teardown(home, state, say)
    if failures:
        raise LabError(f"lab {resolved} down: {len(failures)} step(s) failed: "
                       + "; ".join(failures))
    say(f"lab {resolved} down in {time.monotonic() - started:.2f} s")
    return removed


def find_lab(home: Path, name: str | None = None) -> tuple[LabState, LabPlan]:
    """The recorded state and plan of lab ``name`` in ``home`` (``name`` None: as
    :func:`lab_down` resolves it). Raises :class:`NotFoundError` when there is no
    such lab."""
    return _load(_abs(home), name)


def find_host(home: Path, host: str, name: str | None = None) -> tuple[LabState, LabPlan, HostPlan]:
    """The recorded state and plan of lab ``name`` in ``home`` (``name`` None: as
    :func:`lab_down` resolves it) and the plan of its host ``host``.

    Raises :class:`NotFoundError` when there is no such lab or host."""
    state, plan = _load(_abs(home), name)
    return state, plan, _host_plan(plan, host)


def shape_link(plan: LabPlan, host: str, rate: str,
               directions: tuple[Direction, ...] = ("up", "down")) -> None:
    """tbf at ``rate`` (tc syntax) on ``host``'s migration veth, in ``directions``:
    ``up`` (host -> switch) shapes the host's end, ``down`` (switch -> host) the
    switch's end (tbf shapes what an interface sends).

    Raises :class:`LabError` when ``tc`` fails (an end may be shaped already)."""
    hp = plan.host(host)
    burst, latency = tbf_params(rate)
    ends = {"up": (hp.mig_if, hp.netns), "down": (hp.mig_switch_if, plan.switch_netns)}
    for direction in directions:
        dev, ns = ends[direction]
        _sys.tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                "burst", str(burst), "latency", latency, netns=ns)


def lab_status(home: Path, name: str | None = None) -> LabStatus:
    """What of the lab exists now. Raises :class:`NotFoundError` if no lab is
    recorded. Without root, link rates read as None."""
    home = _abs(home)
    state, plan = _load(home, name)
    labdir = lab_dir(home, state.name)
    sshd_pidfiles = {r.name: Path(r.path) for r in state.resources
                     if r.kind == "sshd" and r.path}
    hosts = []
    for hp in plan.hosts:
        present = _sys.netns_exists(hp.netns)
        pidfile = sshd_pidfiles.get(hp.host)
        pid = _sys.read_pidfile(pidfile) if pidfile else None
        up_rate = down_rate = link_ok = None
        if present:
            up_rate = _tbf_rate(_sys.qdisc_line(hp.mig_if, hp.netns))
            down_rate = _tbf_rate(_sys.qdisc_line(hp.mig_switch_if, plan.switch_netns))
            link_ok = _is_up(hp.mig_if, hp.netns) and _is_up(hp.mig_switch_if, plan.switch_netns)
        hosts.append(HostStatus(
            host=hp.host, netns=hp.netns, netns_present=present, sshd_pid=pid,
            sshd_alive=pid is not None and _sys.pid_alive(pid),
            mgmt_address=hp.mgmt_address, migration_address=hp.migration_address,
            uplink_rate=up_rate, downlink_rate=down_rate, link_up=bool(link_ok),
            qemu_pids=tuple(pid for pid, _ in _qemu_pids(_host_dir(labdir, hp.host) / "data")),
        ))
    return LabStatus(
        name=state.name, index=state.index, dir=labdir, phase=state.phase,
        link_rate=state.link_rate, vm_network=plan.vm_network, probe_netns=plan.probe_netns,
        probe_address=plan.probe_address, switch_present=_sys.netns_exists(plan.switch_netns),
        probe_present=_sys.netns_exists(plan.probe_netns), hosts=tuple(hosts),
    )


# -- building ------------------------------------------------------------------


class _Builder:
    """Creates the lab, recording each resource in the state file first."""

    def __init__(self, home: Path, plan: LabPlan, state: LabState, say: Say) -> None:
        self.home = home
        self.plan = plan
        self.state = state
        self.say = say
        self.dir = lab_dir(home, plan.name)
        self.state_path = self.dir / STATE_NAME

    def record(self, *resources: Resource) -> None:
        self.state.resources.extend(resources)
        write_state(self.state_path, self.state)

    def build(self) -> Inventory:
        plan = self.plan
        self.make_dirs_and_keys()
        self.make_namespaces_and_links()
        odd = []
        for hp in plan.hosts:
            up, down = self.state.link_rates(hp.host)
            shape_link(plan, hp.host, up, ("up",))
            shape_link(plan, hp.host, down, ("down",))
            if (up, down) != (self.state.link_rate, self.state.link_rate):
                odd.append(f"{hp.host} up {up} down {down}")
        self.say(f"migration links shaped to {self.state.link_rate} (tbf, both directions)"
                 + (f", except {'; '.join(odd)}" if odd else ""))
        self.start_sshds()
        inventory = self.write_inventory()
        self.make_tls_credentials(inventory)
        self.state.phase = "up"
        write_state(self.state_path, self.state)
        return inventory

    def make_dirs_and_keys(self) -> None:
        (self.dir / "shared").mkdir()
        for hp in self.plan.hosts:
            for sub in ("data", "local"):
                (_host_dir(self.dir, hp.host) / sub).mkdir(parents=True)
        _sshd.keygen(self.dir / "id_ed25519", f"vmigrate-lab-{self.plan.name}-controller")
        for hp in self.plan.hosts:
            _sshd.keygen(_sshd.SshdFiles.under(_host_dir(self.dir, hp.host)).host_key,
                         f"vmigrate-lab-{self.plan.name}-{hp.host}")
        self.say("directories and ssh keys created")

    def make_namespaces_and_links(self) -> None:
        p = self.plan
        sw, probe = p.switch_netns, p.probe_netns
        namespaces = [sw, probe, *(hp.netns for hp in p.hosts)]

        # Root namespace: the namespaces, the management bridge, its host ports.
        self.record(*(Resource("netns", name=ns) for ns in namespaces))
        self.record(Resource("link", name=p.mgmt_bridge),
                    *(r for hp in p.hosts for r in (Resource("link", name=hp.mgmt_root),
                                                     Resource("link", hp.mgmt_if, hp.netns))))
        prefix = p.mgmt_network.split("/")[1]
        _sys.ip_batch([
            *(f"netns add {ns}" for ns in namespaces),
            f"link add {p.mgmt_bridge} type bridge",
            f"addr add {p.mgmt_gateway}/{prefix} dev {p.mgmt_bridge}",
            f"link set {p.mgmt_bridge} up",
            *(line for hp in p.hosts for line in (
                f"link add {hp.mgmt_root} type veth peer name {hp.mgmt_if} netns {hp.netns}",
                f"link set {hp.mgmt_root} master {p.mgmt_bridge} up",
            )),
        ])
        self.say(f"namespaces {', '.join(namespaces)}; management bridge {p.mgmt_bridge} "
                 f"{p.mgmt_gateway}")

        # Switch namespace: migration and VM bridges, every host's and the probe's port.
        self.record(
            Resource("link", p.switch_mig_bridge, sw), Resource("link", p.switch_vm_bridge, sw),
            *(Resource("link", n, ns) for hp in p.hosts for n, ns in (
                (hp.mig_switch_if, sw), (hp.mig_if, hp.netns),
                (hp.vm_switch_if, sw), (hp.vm_if, hp.netns), (VM_BRIDGE, hp.netns))),
            Resource("link", p.probe_switch_if, sw), Resource("link", p.probe_if, probe),
        )
        _sys.ip_batch([
            "link set lo up",
            f"link add {p.switch_mig_bridge} type bridge",
            f"link set {p.switch_mig_bridge} up",
            f"link add {p.switch_vm_bridge} type bridge",
            f"link set {p.switch_vm_bridge} up",
            *(line for hp in p.hosts for line in (
                f"link add {hp.mig_switch_if} type veth peer name {hp.mig_if} netns {hp.netns}",
                f"link set {hp.mig_switch_if} master {p.switch_mig_bridge} up",
                f"link add {hp.vm_switch_if} type veth peer name {hp.vm_if} netns {hp.netns}",
                f"link set {hp.vm_switch_if} master {p.switch_vm_bridge} up",
            )),
            f"link add {p.probe_switch_if} type veth peer name {p.probe_if} netns {probe}",
            f"link set {p.probe_switch_if} master {p.switch_vm_bridge} up",
        ], netns=sw)

        # Each host: addresses, brvm, links up.
        mig_prefix = p.migration_network.split("/")[1]
        for hp in p.hosts:
            _sys.ip_batch([
                "link set lo up",
                f"addr add {hp.mgmt_address}/{prefix} dev {hp.mgmt_if}",
                f"link set {hp.mgmt_if} up",
                f"addr add {hp.migration_address}/{mig_prefix} dev {hp.mig_if}",
                f"link set {hp.mig_if} up",
                f"link add {VM_BRIDGE} type bridge",
                f"link set {VM_BRIDGE} up",
                f"link set {hp.vm_if} master {VM_BRIDGE} up",
            ], netns=hp.netns)
        vm_prefix = p.vm_network.split("/")[1]
        _sys.ip_batch([
            "link set lo up",
            f"addr add {p.probe_address}/{vm_prefix} dev {p.probe_if}",
            f"link set {p.probe_if} up",
        ], netns=probe)
        self.say(f"migration switch {sw}; VM network {p.vm_network} with probe {probe} "
                 f"{p.probe_address}")

    def start_sshds(self) -> None:
        _sshd.ensure_privsep_dir()
        authorized = self.dir / "id_ed25519.pub"
        files = {}
        for hp in self.plan.hosts:
            f = _sshd.SshdFiles.under(_host_dir(self.dir, hp.host))
            files[hp.host] = f
            f.config.write_text(_sshd.config_text(
                hp.mgmt_address, f, authorized,
                f"vmigrate lab {self.plan.name} host {hp.host} (netns {hp.netns})"))
            self.record(Resource("sshd", hp.host, hp.netns, str(f.pidfile)))
            _sshd.start(hp.netns, f)
        lines = []
        for hp in self.plan.hosts:
            f = files[hp.host]
            pid = _sshd.wait_ready(hp.mgmt_address, f)
            self.say(f"sshd {hp.host} pid {pid} on {hp.mgmt_address}:22")
            lines.append(_sshd.known_hosts_line(hp.mgmt_address, f.host_key.with_suffix(".pub")))
        (self.dir / "known_hosts").write_text("\n".join(lines) + "\n")

    def make_tls_credentials(self, inventory: Inventory) -> None:
        """The lab CA in ``<lab dir>/pki``; each host's QEMU TLS credentials in its
        ``tls_path``, naming its management and migration addresses."""
        ca = self.dir / "pki"
        pki.create_ca(ca, name=f"vmigrate lab {self.plan.name} CA")
        for hp in self.plan.hosts:
            files = pki.host_credentials(ca, hp.host, [hp.mgmt_address, hp.migration_address])
            pki.write_local(inventory.host(hp.host).tls_path, files)
            pki.record_issued(ca, hp.host, files)
        self.say(f"TLS credentials from the lab CA {ca} in each host's tls dir")

    def write_inventory(self) -> Inventory:
        p = self.plan
        key = self.dir / "id_ed25519"
        known = self.dir / "known_hosts"
        hosts = {
            hp.host: HostConfig(
                name=hp.host, transport="ssh", address=hp.mgmt_address, port=22, user="root",
                key=key, known_hosts=known, data_dir=_host_dir(self.dir, hp.host) / "data",
                migration_address=hp.migration_address, vm_bridge=VM_BRIDGE,
                pools={"local": _host_dir(self.dir, hp.host) / "local",
                       "shared": self.dir / "shared"},
                accel="tcg",
                # lab hosts share this machine's files: they run this very package
                vmigrate_command=[sys.executable, "-m", "vmigrate"],
            )
            for hp in p.hosts
        }
        lab = LabConfig(name=p.name, dir=self.dir, vm_network=p.vm_network,
                        probe_netns=p.probe_netns, gateway=None)
        # each host's migration link, as shaped: its uplink and downlink with the rate
        # tc was given; migrations may use LAB_LINK_BUDGET of each (the rest leaves room
        # for the tenant-traffic generator)
        links = {}
        for hp in p.hosts:
            up, down = self.state.link_rates(hp.host)
            for name, rate in ((f"{hp.host}-up", up), (f"{hp.host}-down", down)):
                links[name] = LinkConfig(capacity=f"{parse_rate(rate)}bit",
                                         budget=LAB_LINK_BUDGET)
        path = self.home / CONFIG_NAME
        text = dump_inventory(Inventory(hosts=hosts, lab=lab, links=links))
        inventory = parse_inventory(text, str(path)).model_copy(update={"path": path})
        self.record(Resource("inventory", path=str(path)))
        atomic_write(path, text)
        self.say(f"inventory written to {path}")
        return inventory


# -- teardown ------------------------------------------------------------------


def _teardown(home: Path, state: LabState, say: Say) -> tuple[list[str], list[str]]:
    """Remove everything ``state`` records; every step guarded.
    Returns (removed, failures); the lab directory is removed only if no step failed."""
    plan = make_plan(state.name, state.index, state.hosts)
    labdir = lab_dir(home, state.name)
    removed: list[str] = []
    failures: list[str] = []

    def guard(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            failures.append(f"{what}: {exc}")
            say(f"FAILED {what}: {exc}")

    def stop_qemu(data: Path) -> None:
        for pid, pidfile in _qemu_pids(data):
            left = _sys.terminate([pid])
            if left:
                raise LabError(f"QEMU pid {pid} ({pidfile}) survived SIGKILL")
            removed.append(f"qemu pid {pid} ({pidfile})")
            say(f"stopped QEMU pid {pid}")

    for hp in plan.hosts:
        guard(f"stop QEMU of {hp.host}",
              functools.partial(stop_qemu, _host_dir(labdir, hp.host) / "data"))

    def stop_sshd(res: Resource) -> None:
        pid = _sys.read_pidfile(Path(res.path)) if res.path else None
        if pid is None or not _sys.pid_alive(pid) or not _is_our_sshd(pid, res):
            return
        if _sys.terminate([pid]):
            raise LabError(f"sshd pid {pid} survived SIGKILL")
        removed.append(f"sshd pid {pid} ({res.name})")
        say(f"stopped sshd of {res.name} (pid {pid})")

    for res in state.resources:
        if res.kind == "sshd":
            guard(f"stop sshd of {res.name}", functools.partial(stop_sshd, res))

    namespaces = [r.name for r in state.resources if r.kind == "netns"]

    def stop_stragglers() -> None:
        for ns, pids in _sys.pids_in_netns(namespaces).items():
            for pid in pids:
                argv = _sys.cmdline(pid)
                removed.append(f"process {pid} ({argv[0] if argv else '?'}) in {ns}")
                say(f"stopping process {pid} ({' '.join(argv)[:80]}) left in {ns}")
            left = _sys.terminate(pids)
            if left:
                raise LabError(f"processes {left} in {ns} survived SIGKILL")

    guard("stop processes left in the lab namespaces", stop_stragglers)

    def delete_netns(ns: str) -> None:
        if _sys.netns_exists(ns):
            _sys.ip("netns", "delete", ns)
            removed.append(f"netns {ns}")

    for ns in reversed(namespaces):
        guard(f"delete netns {ns}", functools.partial(delete_netns, ns))
    if namespaces:
        say(f"deleted namespaces {', '.join(namespaces)}")

    def delete_link(name: str) -> None:
        # A veth end whose peer was in a deleted namespace vanishes on its own, but
        # asynchronously (the kernel cleans namespaces up in a work queue).
        if _sys.link_exists(name):
            try:
                _sys.ip("link", "delete", "dev", name)
            except LabError:
                if _sys.link_exists(name):
                    raise
            removed.append(f"link {name}")

    for res in reversed(state.resources):
        if res.kind == "link" and res.netns is None:
            guard(f"delete link {res.name}", functools.partial(delete_link, res.name))

    def sweep_root_links() -> None:
        # The "<name>-" prefix belongs to this lab (lab_up refused to start if any
        # such interface existed): this also removes e.g. tap devices a caller made.
        for link in _sys.root_links():
            if _owned_by(state.name, link):
                delete_link(link)

    guard("delete other root-namespace interfaces of the lab", sweep_root_links)

    def delete_inventory() -> None:
        inv = _remove_lab_inventory(home, state.name, labdir)
        if inv:
            removed.append(inv)

    if any(r.kind == "inventory" for r in state.resources) or (home / CONFIG_NAME).exists():
        guard("remove the lab inventory", delete_inventory)

    if failures:
        say(f"kept {labdir / STATE_NAME} for a rerun of lab down")
    else:
        def delete_dir() -> None:
            if labdir.exists():
                shutil.rmtree(labdir)
                removed.append(f"directory {labdir}")

        guard(f"remove {labdir}", delete_dir)
    return removed, failures


def _is_our_sshd(pid: int, res: Resource) -> bool:
    """Is ``pid`` the sshd this resource started (guards against PID reuse)?"""
    argv = _sys.cmdline(pid)
    if not argv or "sshd" not in argv[0]:
        return False
    if res.netns is not None:
        key = _sys.netns_key(res.netns)
        if key is not None:
            return _sys.pid_netns_key(pid) == key
    # namespace already gone: fall back to the config path on the command line
    return res.path is not None and str(Path(res.path).parent) in " ".join(argv)


def _qemu_pids(data: Path) -> list[tuple[int, Path]]:
    """Live QEMU processes whose pidfile (``*.pid``) is under ``data``, verified
    through ``/proc/<pid>/cmdline`` (mentions qemu and that pidfile)."""
    found: list[tuple[int, Path]] = []
    if not data.is_dir():
        return found
    for pidfile in sorted(data.rglob("*.pid")):
        pid = _sys.read_pidfile(pidfile)
        if pid is None or not _sys.pid_alive(pid):
            continue
        argv = _sys.cmdline(pid)
        if any("qemu" in a for a in argv) and _mentions(pid, argv, pidfile):
            found.append((pid, pidfile))
    return found


def _mentions(pid: int, argv: list[str], pidfile: Path) -> bool:
    """Does ``argv`` name ``pidfile`` (absolute, or relative to the process's cwd)?"""
    target = os.path.realpath(pidfile)
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = "/"
    for arg in argv:
        for token in arg.replace("=", ",").split(","):
            if token.endswith(pidfile.name) and \
                    os.path.realpath(os.path.join(cwd, token)) == target:
                return True
    return False


def _remove_lab_inventory(home: Path, name: str, labdir: Path) -> str | None:
    """Delete ``<home>/vmigrate.toml`` if it is this lab's inventory."""
    path = home / CONFIG_NAME
    try:
        inv = load_inventory(path)
    except FileNotFoundError:
        return None
    except ConfigError:
        return None  # not ours to judge: leave it
    if inv.lab is None or inv.lab.name != name or _abs(inv.lab.dir) != labdir:
        return None
    path.unlink()
    return f"inventory {path}"


# -- helpers -------------------------------------------------------------------



def _abs(home: Path) -> Path:
    return Path(os.path.abspath(home))


def _host_dir(labdir: Path, host: str) -> Path:
    return labdir / "hosts" / host


def _check_tools() -> None:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if not os.access(_sshd.SSHD, os.X_OK):
        missing.append(_sshd.SSHD)
    if missing:
        raise EnvironmentError_(
            f"the lab needs {', '.join(missing)}: apt-get install iproute2 openssh-server "
            "openssh-client"
        )


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    try:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LabError(f"cannot open the lab lock {LOCK_PATH}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _labs(home: Path) -> list[str]:
    try:
        return sorted(p.name for p in (home / "labs").iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _indexes_of_labs(home: Path) -> list[int]:
    """Indexes recorded by the labs of this home (even if their links are gone)."""
    indexes = []
    for name in _labs(home):
        with contextlib.suppress(FileNotFoundError, LabError):
            indexes.append(read_state(home / "labs" / name / STATE_NAME).index)
    return indexes


def _owned_by(name: str, thing: str) -> bool:
    """Is namespace or root interface ``thing`` named like lab ``name``'s?"""
    return thing.startswith(f"{name}-")


def _refuse_if_taken(home: Path, name: str) -> None:
    path = home / CONFIG_NAME
    if path.exists():
        try:
            inv = load_inventory(path)
        except ConfigError as exc:
            raise ConflictError(
                f"{path} exists and is not a lab inventory ({exc}); the lab will not "
                "overwrite it: use another VMIGRATE_HOME"
            ) from exc
        if inv.lab is None:
            raise ConflictError(
                f"{path} is your own inventory (it has no [lab] section); the lab will "
                "not overwrite it: use another VMIGRATE_HOME"
            )
        if inv.lab.name != name and (home / "labs" / inv.lab.name / STATE_NAME).exists():
            raise ConflictError(
                f"lab {inv.lab.name!r} is up in {home}: run 'vmigrate lab down' first"
            )
    if (home / "labs" / name).exists():
        raise ConflictError(f"lab {name!r} is already up in {home} (or was not torn down): "
                         "run 'vmigrate lab down' first")
    taken = [ns for ns in _sys.netns_names() if _owned_by(name, ns)]
    taken += [link for link in _sys.root_links() if _owned_by(name, link)]
    if taken:
        raise ConflictError(
            f"a lab named {name!r} seems up elsewhere on this machine (another "
            f"VMIGRATE_HOME?): {', '.join(taken)} exist; pick another name"
        )


def _resolve_name(home: Path, name: str | None) -> str | None:
    """The lab meant by ``name``; None when no lab is known in ``home``."""
    if name is not None:
        return validate_name(name)
    path = home / CONFIG_NAME
    with contextlib.suppress(FileNotFoundError, ConfigError):
        inv = load_inventory(path)
        if inv.lab is not None:
            return validate_name(inv.lab.name)
    labs = _labs(home)
    if len(labs) > 1:
        raise UserError(f"several labs in {home / 'labs'}: {', '.join(labs)}; name one")
    return labs[0] if labs else None


def _load(home: Path, name: str | None) -> tuple[LabState, LabPlan]:
    resolved = _resolve_name(home, name)
    if resolved is None:
        raise NotFoundError(f"no lab in {home}: run 'vmigrate lab up'")
    try:
        state = read_state(lab_dir(home, resolved) / STATE_NAME)
    except FileNotFoundError:
        raise NotFoundError(f"lab {resolved!r} is not up in {home}") from None
    return state, make_plan(state.name, state.index, state.hosts)


def _host_plan(plan: LabPlan, host: str) -> HostPlan:
    try:
        return plan.host(host)
    except KeyError:
        known = ", ".join(hp.host for hp in plan.hosts)
        raise NotFoundError(f"lab {plan.name} has no host {host!r} (hosts: {known})") from None


def _tbf_rate(line: str | None) -> str | None:
    if not line:
        return None
    words = line.split()
    if "tbf" not in words or "rate" not in words:
        return None
    i = words.index("rate")
    return words[i + 1] if i + 1 < len(words) else None


def _is_up(dev: str, netns: str) -> bool:
    info = _sys.link_info(dev, netns)
    return info is not None and "UP" in info.get("flags", [])

