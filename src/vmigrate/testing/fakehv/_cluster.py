"""The fake cluster: hosts, links, guests, time and the injected faults.

Everything the fake drivers, monitors and mover do goes through here, so the
invariants (no split brain, no lost write) are checked in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import ConflictError, NotFoundError, VmigrateError
from vmigrate.pki import x509_dn
from vmigrate.plan.simulate import SimulatedMigration
from vmigrate.qemu.cpu import effective_cpu
from vmigrate.qemu.spec import VMSpec
from vmigrate.testing.fakehv import _pki
from vmigrate.testing.fakehv._faults import Call, Fault, Side
from vmigrate.testing.fakehv._migration import FakeMigration
from vmigrate.testing.fakehv._model import (
    AckedWrite,
    AuthzObject,
    FakeExport,
    FakeHost,
    FakeImage,
    FakeJob,
    FakeNode,
    FakeVm,
    GuestProfile,
    PortUse,
    SplitBrain,
    TlsObject,
    guest_record,
    parse_record,
)

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._driver import FakeDriver
    from vmigrate.testing.fakehv._monitor import FakeMonitor
    from vmigrate.testing.fakehv._mover import FakeMover

__all__ = ["KNOWN_CAPABILITIES", "FakeBackend", "FakeCluster"]


class FakeBackend:
    """A migration service's backend on a fake cluster (drivers and mover)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def driver(self, cfg: HostConfig) -> FakeDriver:
        return self.cluster.driver(cfg.name)

    def mover(self, drivers: Mapping[str, object]) -> FakeMover:
        return self.cluster.mover

MiB = 1 << 20

#: the migration capabilities of QEMU 7.2 (``query-migrate-capabilities``)
KNOWN_CAPABILITIES = frozenset({
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt",
})
#: string parameters QEMU keeps for the engine (not part of the simulated physics)
TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_ANY = frozenset({"0.0.0.0", "::"})
_BANNER = "Linux version 6.1.0 (fake@vmigrate) #1 SMP PREEMPT_DYNAMIC\n"


def default_parameters() -> dict[str, object]:
    """``query-migrate-parameters`` of a fresh QEMU 7.2 (the part the fake models)."""
    params: dict[str, object] = dict(SimulatedMigration(ram=1, link_rate=1.0).params)
    params.update({name: "" for name in TLS_PARAMETERS})
    params["xbzrle-cache-size"] = 64 * MiB
    return params


def sim_parameters(params: Mapping[str, object]) -> dict[str, object]:
    """The parameters :class:`SimulatedMigration` knows, out of a VM's."""
    known = SimulatedMigration(ram=1, link_rate=1.0).params
    return {k: v for k, v in params.items() if k in known}


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


@dataclass
class _Hit:
    """The faults that hit one call: one before its effect, or some after it."""

    before: Fault | None = None
    after: list[Fault] = field(default_factory=list)


class FakeCluster:
    """In-memory QEMU/KVM hosts for the engine's unit tests (see the package doc).

    ``hosts``: the inventory's host entries (every one needs a name). ``shared``:
    directories every host sees as the same storage (None: each pool named
    ``shared`` is shared by the hosts whose inventory lists it at the same path).
    ``link_rate``: bytes/s of every migration link (:meth:`set_link_rate` changes
    one). ``tls``: give every host QEMU's x509 files in its ``tls_path``.
    ``disk_size``: the size of disk images :meth:`add_vm` creates when they are
    missing. ``mirror_piece``: blocks a mirror copies per ``block_jobs()`` call.
    ``sample_s``: simulated seconds a ``migration()`` call advances a migration by.
    ``acpi_ticks``: ticks a guest takes to power off after the power button.
    """

    def __init__(self, hosts: Inventory | Iterable[HostConfig], *,
                 shared: Iterable[str] | None = None, link_rate: float = 125e6,
                 qemu_version: tuple[int, int, int] = (7, 2, 0), block_size: int = 64 * 1024,
                 guest_blocks: int = 16, mirror_piece: int = 16, sample_s: float = 0.5,
                 call_s: float = 0.01, acpi_ticks: int = 2, tls: bool = True,
                 capacity: int = 1 << 40, disk_size: int = 16 * MiB) -> None:
        configs = list(hosts.hosts.values()) if isinstance(hosts, Inventory) else list(hosts)
        if not configs:
            raise ValueError("a fake cluster needs at least one host")
        self.hosts: dict[str, FakeHost] = {}
        for config in configs:
            if not config.name or config.name in self.hosts:
                raise ValueError(f"every host needs a unique name (got {config.name!r})")
            self.hosts[config.name] = FakeHost(config, capacity=capacity,
                                               qemu_version=qemu_version)
        #: every driver, monitor and mover call, in order
        self.calls: list[Call] = []
        #: injected faults, in the order they are checked
        self.faults: list[Fault] = []
        #: advanced by every call
        self.tick = 0
        #: simulated seconds: ``call_s`` per call, ``sample_s`` per ``migration()``
        self.time = 0.0
        #: every time two processes of one VM ran their guests at once
        self.split_brain: list[SplitBrain] = []
        #: every migration started, oldest first
        self.migrations: list[FakeMigration] = []
        self.block_size = block_size
        self.guest_blocks = guest_blocks
        self.mirror_piece = mirror_piece
        self.sample_s = sample_s
        self.call_s = call_s
        self.acpi_ticks = acpi_ticks
        self.disk_size = disk_size
        self._default_rate = link_rate
        self._down: set[frozenset[str]] = set()
        self._rates: dict[frozenset[str], float] = {}
        self._guests: dict[str, GuestProfile] = {}
        self._seq: dict[str, int] = {}
        self._acked: dict[str, dict[int, int]] = {}
        self._last_runner: dict[str, FakeVm] = {}
        self._split: set[str] = set()
        self._pid = 1000
        self._drivers: dict[str, FakeDriver] = {}
        self._monitors: dict[tuple[str, str], list[FakeMonitor]] = {}
        self._mover: FakeMover | None = None
        self._shared: list[tuple[str, frozenset[str]]] = []
        if shared is None:
            groups: dict[str, set[str]] = {}
            for config in configs:
                pool = config.pools.get("shared")
                if pool is not None:
                    groups.setdefault(str(pool), set()).add(config.name)
            self._shared = [(p, frozenset(m)) for p, m in groups.items() if len(m) > 1]
        else:
            self._shared = [(p, frozenset(self.hosts)) for p in shared]
        if tls:
            for h in self.hosts.values():
                addresses = tuple(dict.fromkeys(
                    a for a in (h.config.address, h.config.migration_address) if a))
                self.install_credentials(h.name, _pki.credentials(h.name, addresses))

    # -- the seams -------------------------------------------------------------------

    def driver(self, name: str) -> FakeDriver:
        """The host's driver (the same object on every call)."""
        from vmigrate.testing.fakehv._driver import FakeDriver

        host = self.host(name)
        if name not in self._drivers:
            self._drivers[name] = FakeDriver(self, host.config)
        return self._drivers[name]

    def backend(self) -> FakeBackend:
        """What :class:`~vmigrate.service.migrations.MigrationService` takes as its
        ``backend``: this cluster's drivers and mover."""
        return FakeBackend(self)

    @property
    def mover(self) -> FakeMover:
        """The cluster's disk mover (the same object on every call)."""
        from vmigrate.testing.fakehv._mover import FakeMover

        if self._mover is None:
            self._mover = FakeMover(self)
        return self._mover

    def host(self, name: str) -> FakeHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise NotFoundError(f"unknown host {name!r} (known: "
                                f"{', '.join(self.hosts)})") from None

    def restart_controller(self) -> None:
        """A new controller process: every monitor connection of the old one is gone
        (with the events it collected); the hosts, VMs and migrations go on. A
        ``crash`` fault does this when it strikes."""
        for monitors in self._monitors.values():
            for monitor in monitors:
                monitor._disconnect()

    # -- faults ----------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Add ``fault``; it is checked at the start of every call (see :class:`Fault`).

        What a hit does, by kind and seam (monitor / driver / mover):

        * ``command``: :class:`QmpCommandError` (``GenericError``) /
          :class:`CommandError` / :class:`TransferError`; nothing changed.
        * ``connection``: :class:`QmpConnectionError`, and the monitor is disconnected
          (its events are lost; the next call connects again) /
          :class:`HostUnreachableError` / :class:`TransferError`.
        * ``unreachable``: :class:`QmpConnectionError` / :class:`HostUnreachableError`
          / :class:`HostUnreachableError`.
        * ``crash``: :class:`ControllerCrash` (a :class:`BaseException`); every monitor
          connection of the dead controller is dropped (:meth:`restart_controller`).
        * ``cancel``: ``on_cancel()`` is called, then the call proceeds normally.

        ``Driver.vm_state`` answers ``UNKNOWN`` instead of raising for the first three,
        as the real driver does.
        """
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def _enter(self, host: str, vm: str | None, method: str, side: Side, *,
               also: str | None = None, seconds: float | None = None) -> _Hit:
        """Record a call, let a tick pass, and find the faults that hit it."""
        self.calls.append(Call(host, vm, method))
        self._step(self.call_s if seconds is None else seconds)
        hosts = (host,) if also is None or also == host else (host, also)
        hit = _Hit()
        for fault in self.faults:
            if fault.spent or not fault.matches(hosts, vm, method, side):
                continue
            fault.seen += 1
            if fault.seen <= fault.skip:
                continue
            fault.fired += 1
            if fault.kind == "cancel":
                if fault.after:
                    hit.after.append(fault)
                elif fault.on_cancel is not None:
                    fault.on_cancel()
                continue
            if fault.after:
                hit.after.append(fault)
            else:
                hit.before = fault
            break
        return hit

    # -- links and reachability ------------------------------------------------------

    def link_down(self, a: str, b: str) -> None:
        """Cut the migration link between hosts ``a`` and ``b``: streams and mirrors
        between them stop moving (no error, as a real cut link), ``can_reach`` says
        False, copies fail."""
        self.host(a), self.host(b)
        self._down.add(frozenset((a, b)))

    def link_up(self, a: str, b: str) -> None:
        self._down.discard(frozenset((a, b)))

    def link_is_up(self, a: str, b: str) -> bool:
        return a == b or frozenset((a, b)) not in self._down

    def set_link_rate(self, a: str, b: str, rate: float) -> None:
        """Bytes/s the link between ``a`` and ``b`` carries."""
        self._rates[frozenset((a, b))] = rate

    def link_rate(self, a: str, b: str) -> float:
        return self._rates.get(frozenset((a, b)), self._default_rate)

    def set_reachable(self, host: str, reachable: bool) -> None:
        """Whether the controller reaches ``host`` (its VMs and links go on either way)."""
        self.host(host).reachable = reachable

    def _host_by_address(self, address: str, seen_from: str) -> FakeHost | None:
        if address in _LOOPBACK:
            return self.hosts[seen_from]
        if address in self.hosts[seen_from].addresses:
            return self.hosts[seen_from]
        return next((h for h in self.hosts.values() if address in h.addresses), None)

    @staticmethod
    def _can_bind(host: FakeHost, address: str) -> bool:
        return address in host.addresses or address in _LOOPBACK or address in _ANY

    def occupy_port(self, host: str, port: int, owner: str = "other") -> None:
        """Take ``port`` on ``host`` by something else than QEMU."""
        self.host(host).ports[port] = PortUse(owner)

    def _release_port(self, vm: FakeVm, *, recover: bool = False,
                      kind: str | None = None) -> None:
        wanted = kind or ("recover" if recover else "listen")
        ports = self.hosts[vm.host].ports
        for port, use in list(ports.items()):
            if use.pid == vm.pid and use.kind == wanted:
                del ports[port]

    # -- files -----------------------------------------------------------------------

    def _sharing(self, host: str, path: str) -> list[FakeHost]:
        for prefix, members in self._shared:
            if host in members and _under(path, prefix):
                return [h for h in self.hosts.values() if h.name in members]
        return [self.hosts[host]]

    def _put_file(self, host: str, path: str, image: FakeImage) -> None:
        for h in self._sharing(host, path):
            h.files[path] = image

    def _drop_file(self, host: str, path: str) -> None:
        for h in self._sharing(host, path):
            h.files.pop(path, None)

    def add_image(self, host: str, path: str, fmt: str = "raw", size: int | None = None, *,
                  data: bytes | Mapping[int, bytes] | None = None) -> FakeImage:
        """A disk image on ``host`` (on every host sharing its directory). ``data``:
        bytes from offset 0, or the content of blocks by index."""
        h = self.host(host)
        if path in h.files:
            raise ConflictError(f"{path} already exists on {host}")
        image = FakeImage(path, fmt, self.disk_size if size is None else size,
                          block_size=self.block_size)
        if isinstance(data, bytes):
            image.write(0, data)
        elif data is not None:
            for index, content in data.items():
                image.write_block(index, content)
        self._put_file(host, path, image)
        return image

    def add_file(self, host: str, path: str, data: bytes = b"") -> FakeImage:
        """Any other file (a kernel, TLS credentials, a manifest)."""
        image = FakeImage(path, "raw", max(1, len(data)), block_size=self.block_size)
        if data:
            image.write(0, data)
        self._put_file(self.host(host).name, path, image)
        return image

    def install_credentials(self, host: str, files: Mapping[str, bytes],
                            directory: str | None = None) -> None:
        """x509 files (:func:`vmigrate.pki.host_credentials`) into ``directory`` on
        ``host`` (default its ``tls_path``), replacing what was there."""
        h = self.host(host)
        base = (directory or str(h.config.tls_path)).rstrip("/")
        for name, data in files.items():
            self._drop_file(h.name, f"{base}/{name}")
            self.add_file(h.name, f"{base}/{name}", data)

    def _client_identity(self, vm: FakeVm, tls_id: str) -> str | None:
        """The DN of the client certificate a VM's tls-creds object presents."""
        obj = vm.objects.get(tls_id)
        if not isinstance(obj, TlsObject):
            return None
        try:
            return x509_dn(_pki.read(dict(self.host(vm.host).files),
                                     f"{obj.directory}/client-cert.pem"))
        except VmigrateError:
            return None

    def _authz_refusal(self, server: FakeVm, authz: str | None, client: FakeVm,
                       tls_id: str | None) -> str | None:
        """Why ``server``'s tls-authz object ``authz`` refuses ``client`` (None: it
        does not), as QEMU's TLS session check says it."""
        if not authz:
            return None
        obj = server.objects.get(authz)
        if not isinstance(obj, AuthzObject):
            return f"No authorization object with id '{authz}'"
        identity = self._client_identity(client, tls_id) if tls_id else None
        if identity is None or identity != obj.identity:
            return f"TLS x509 authz check for {identity} is denied"
        return None

    # -- guests and VMs --------------------------------------------------------------

    def guest(self, vm: str) -> GuestProfile:
        """How ``vm``'s guest behaves (change its fields to change it, e.g. the dirty
        rate in the middle of a migration)."""
        if vm not in self._guests:
            self._guests[vm] = GuestProfile(ram=256 * MiB)
        return self._guests[vm]

    def add_vm(self, host: str, spec: VMSpec, *, running: bool = True, ram: int | None = None,
               dirty_rate: float = 0.0, wss: int | None = None,
               acpi: bool = True) -> FakeVm:
        """A VM whose process already runs on ``host`` (as after ``vm create``); its
        disk images and kernel files are created when missing. ``running`` False:
        its guest is paused."""
        h = self.host(host)
        if spec.name in h.vms:
            raise ConflictError(f"VM {spec.name} already runs on {host}")
        for disk in spec.disks:
            if disk.path not in h.files:
                self.add_image(host, disk.path, disk.format)
        if spec.kernel is not None:
            for path in (spec.kernel.kernel, spec.kernel.initrd):
                if path is not None and path not in h.files:
                    self.add_file(host, path, b"\x7fELF fake kernel")
        self._guests[spec.name] = GuestProfile(ram=spec.memory_mib * MiB if ram is None else ram,
                                               dirty_rate=dirty_rate, wss=wss, acpi=acpi)
        problem = self._lock_conflict(h, spec)
        if problem is not None:
            raise ConflictError(problem)
        problem = self._start_problem(h, spec)
        if problem is not None:
            raise ValueError(f"QEMU on {host} would not start {spec.name}: {problem}")
        vm = self._spawn(h, spec, incoming=False, held=False)
        if not running:
            self._set_run_state(vm, "paused")
        return vm

    def processes(self, vm: str) -> list[FakeVm]:
        """Every live process of ``vm`` on every host (orphans included)."""
        return [p for h in self.hosts.values() for p in h.processes() if p.name == vm]

    def running(self, vm: str) -> list[FakeVm]:
        """The processes of ``vm`` whose guest runs now (more than one: split brain)."""
        return [p for p in self.processes(vm) if p.run_state == "running"]

    def find(self, vm: str, host: str) -> FakeVm | None:
        """The process of ``vm`` the driver of ``host`` finds."""
        return self.host(host).vms.get(vm)

    def _new_pid(self) -> int:
        self._pid += 1
        return self._pid

    def _lock_conflict(self, host: FakeHost, spec: VMSpec) -> str | None:
        """Why QEMU could not take a writable disk of ``spec`` (another holds it)."""
        for disk in spec.disks:
            image = host.files.get(disk.path)
            if image is not None and not disk.readonly and image.writers:
                return (f"Failed to get \"write\" lock on {disk.path}: is another process "
                        f"using the image?")
        return None

    def _start_problem(self, host: FakeHost, spec: VMSpec) -> str | None:
        """Why the host's QEMU refuses to start ``spec`` (QEMU's own words), or None: a
        machine type or CPU model it does not know. A CPU feature the host lacks is no
        reason: QEMU starts the guest without it (vmigrate does not ``enforce``)."""
        if host.qemu.resolve_machine(spec.machine) is None:
            return f"-machine {spec.machine}: unsupported machine type"
        cpu = effective_cpu(spec.cpu, host.config.accel)
        if not host.qemu.knows_cpu(cpu.model):
            return f"unable to find CPU model '{cpu.model}'"
        return None

    def _spawn(self, host: FakeHost, spec: VMSpec, *, incoming: bool, held: bool) -> FakeVm:
        if spec.name not in self._guests:
            self._guests[spec.name] = GuestProfile(ram=spec.memory_mib * MiB)
        driver = self.driver(host.name)
        vm = FakeVm(pid=self._new_pid(), name=spec.name, host=host.name, spec=spec,
                    run_state="inmigrate" if incoming else ("prelaunch" if held else "running"),
                    incoming=incoming, held=held,
                    capabilities=dict.fromkeys(sorted(KNOWN_CAPABILITIES), False),
                    params=default_parameters(),
                    machine=host.qemu.resolve_machine(spec.machine) or spec.machine,
                    qemu=host.qemu)
        for i, disk in enumerate(spec.disks):
            node = driver.disk_node(i)
            vm.nodes[node] = FakeNode(node, "disk", image=host.files[disk.path],
                                      writable=not disk.readonly)
        host.vms[spec.name] = vm
        if not incoming:
            self._activate(vm)
            if held:
                vm.unbooted = True
            else:
                self._console(vm, self._banner(vm))
                self._last_runner[vm.name] = vm
        self._check_split_brain()
        return vm

    def _exit(self, vm: FakeVm, reason: str) -> None:
        """The process ends (quit, kill, guest power-off, a failed incoming migration)."""
        if not vm.alive:
            return
        self._emit(vm, "SHUTDOWN", {"guest": reason == "guest-shutdown", "reason": reason})
        vm.alive = False
        host = self.hosts[vm.host]
        if host.vms.get(vm.name) is vm:
            del host.vms[vm.name]
        if vm in host.orphans:
            host.orphans.remove(vm)
        self._deactivate(vm)
        for port, use in list(host.ports.items()):
            if use.pid == vm.pid:
                del host.ports[port]
        for path, use in list(host.sockets.items()):
            if use.pid == vm.pid:
                del host.sockets[path]
        vm.run_state = "exited"
        vm.nbd = None
        for monitor in self._monitors.get((vm.host, vm.name), []):
            if monitor._pid == vm.pid:
                monitor._disconnect()
        if vm.outgoing is not None and not vm.outgoing.ended:
            vm.outgoing.peer_gone("source")
        if vm.incoming_migration is not None and not vm.incoming_migration.ended:
            vm.incoming_migration.peer_gone("dest")
        self._check_split_brain()

    def _orphan(self, vm: FakeVm) -> None:
        """Its runtime directory was removed while it ran: the driver cannot find it."""
        host = self.hosts[vm.host]
        if host.vms.get(vm.name) is vm:
            del host.vms[vm.name]
            host.orphans.append(vm)
        for monitor in self._monitors.get((vm.host, vm.name), []):
            if monitor._pid == vm.pid:
                monitor._disconnect()

    def _activate(self, vm: FakeVm) -> str | None:
        """QEMU takes the VM's disks (``bdrv_activate_all``): refused while a writable
        export of a disk is open or another process holds its image; then nothing
        changes."""
        disks = [n for n in vm.nodes.values() if n.kind == "disk" and not n.active]
        for node in disks:
            if not node.writable or node.image is None:
                continue
            for export in vm.exports.values():
                if export.node == node.name and export.writable:
                    return (f"Conflicts with use by block export '{export.id}', which does "
                            f"not allow 'write' on {node.name}")
            if node.image.writers - {vm.pid}:
                return (f"Failed to get \"write\" lock on {node.image.path}: is another "
                        f"process using the image?")
        for node in disks:
            node.active = True
            if node.writable and node.image is not None:
                node.image.writers.add(vm.pid)
        vm.activation_error = None
        return None

    def _deactivate(self, vm: FakeVm) -> None:
        for node in vm.nodes.values():
            if node.kind == "disk":
                node.active = False
                if node.image is not None:
                    node.image.writers.discard(vm.pid)

    def _incoming_start(self, dest: FakeVm, global_running: bool) -> None:
        """The guest arrived (migration completed, or post-copy switched): QEMU 7.2's
        ``process_incoming_migration_bh``."""
        autostart = not dest.held
        late = dest.capabilities.get("late-block-activate", False)
        if not late or (autostart and global_running):
            problem = self._activate(dest)
            if problem is not None:
                dest.activation_error = problem
                autostart = False
        self._set_run_state(dest, "running" if autostart and global_running else "paused")

    def _set_run_state(self, vm: FakeVm, state: str) -> None:
        old = vm.run_state
        if old == state:
            return
        vm.run_state = state
        if state == "running":
            if vm.unbooted:
                vm.unbooted = False
                self._console(vm, self._banner(vm))
            self._last_runner[vm.name] = vm
            self._emit(vm, "RESUME")
        elif old == "running":
            self._emit(vm, "STOP")
        self._check_split_brain()

    def _banner(self, vm: FakeVm) -> str:
        text = _BANNER
        if vm.spec.workload:
            text += f"VMIGRATE READY ip={vm.spec.ip or ''}\n"
        return text

    def _console(self, vm: FakeVm, text: str) -> None:
        consoles = self.hosts[vm.host].consoles
        consoles[vm.name] = consoles.get(vm.name, "") + text

    def _guest_shutdown(self, vm: FakeVm) -> None:
        """The guest powered off: QEMU's shutdown action decides what is left."""
        vm.powerdown_at = None
        if vm.shutdown_action == "pause":
            self._emit(vm, "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            self._set_run_state(vm, "shutdown")
        else:
            self._exit(vm, "guest-shutdown")

    def _reset(self, vm: FakeVm) -> None:
        """``system_reset``: a fresh boot of the guest (its memory starts over)."""
        vm.powerdown_at = None
        vm.memory = vm.memory_at_start = 0
        vm.origin = "boot"
        self._emit(vm, "RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        if vm.run_state in ("running", "inmigrate", "finish-migrate"):
            if vm.run_state == "running":
                self._console(vm, self._banner(vm))
            return
        vm.unbooted = True
        self._set_run_state(vm, "prelaunch")

    # -- time ------------------------------------------------------------------------

    def advance(self, ticks: int = 1) -> None:
        """Let ``ticks`` ticks pass without a call (the guests run)."""
        for _ in range(ticks):
            self._step(self.call_s)

    async def sleep(self, seconds: float) -> None:
        """A sleep for an engine under test: ``seconds`` of simulated time and one tick,
        never a real wait."""
        await asyncio.sleep(0)
        self.time += seconds
        self._step(0.0)

    def clock(self) -> float:
        """Simulated seconds (see ``time``), for an engine's clock."""
        return self.time

    def _all_processes(self) -> list[FakeVm]:
        return [p for h in self.hosts.values() for p in h.processes()]

    def _nbd_clients(self, server: FakeVm) -> int:
        """NBD client nodes connected to ``server``'s NBD server now."""
        return sum(1 for p in self._all_processes() for n in p.nodes.values()
                   if n.kind == "nbd" and n.server_pid == server.pid and n.broken is None)

    def _step(self, seconds: float) -> None:
        """One tick: migrations settle, pressed power buttons are handled, every guest
        that runs writes once."""
        self.tick += 1
        self.time += seconds
        for mig in self.migrations:
            if not mig.ended:
                mig.settle()
        for vm in self._all_processes():
            if (vm.alive and vm.powerdown_at is not None and self.tick >= vm.powerdown_at
                    and vm.run_state == "running" and self.guest(vm.name).acpi):
                self._guest_shutdown(vm)
        for vm in self._all_processes():
            if self._guest_runs(vm):
                self._guest_tick(vm)
        self._check_split_brain()

    def _guest_runs(self, vm: FakeVm) -> bool:
        if not vm.alive or vm.run_state != "running":
            return False
        mig = vm.incoming_migration
        return mig is None or not mig.dest_stalled

    def _guest_tick(self, vm: FakeVm) -> None:
        vm.memory += 1
        vm.acked += 1
        self._last_runner[vm.name] = vm
        disk = vm.disk
        if disk is not None and disk.writable and disk.active and disk.image is not None:
            image = disk.image
            seq = self._seq.get(vm.name, 0) + 1
            record = guest_record(vm.name, seq)
            block = self._guest_block(seq, image)
            if image.block_len(block) >= len(record):
                self._seq[vm.name] = seq
                image.write_block(block, record)
                self._acked.setdefault(vm.name, {})[block] = seq
                self._dirtied(vm, disk.name, block)
        if vm.spec.workload and "memtouch" in vm.spec.workload and vm.memory % 10 == 0:
            self._console(vm, f"MEMCHECK pass={vm.memory // 10} ok\n")

    def _guest_block(self, seq: int, image: FakeImage) -> int:
        if image.nblocks < 2:
            return 0
        area = max(1, min(self.guest_blocks, image.nblocks - 1))
        return 1 + (seq - 1) % area

    def _dirtied(self, vm: FakeVm, node: str, block: int) -> None:
        """The guest wrote ``block`` of ``node``: bitmaps and mirrors see it."""
        for bitmap in vm.bitmaps.values():
            if bitmap.node == node and bitmap.enabled:
                bitmap.blocks.add(block)
        for job in vm.jobs.values():
            if job.device == node and job.status in ("running", "ready") and \
                    not job.aborting and block not in job.pending:
                job.pending.add(block)
                image = vm.nodes[node].image
                job.length += image.block_len(block) if image is not None else 0

    # -- invariants ------------------------------------------------------------------

    def _check_split_brain(self) -> None:
        where: dict[str, list[str]] = {}
        for vm in self._all_processes():
            if vm.alive and vm.run_state == "running":
                where.setdefault(vm.name, []).append(vm.host)
        for name, hosts in where.items():
            if len(hosts) > 1 and name not in self._split:
                self._split.add(name)
                self.split_brain.append(SplitBrain(self.tick, name, tuple(hosts)))
        self._split = {n for n in self._split if len(where.get(n, ())) > 1}

    def acked_writes(self, vm: str) -> dict[int, int]:
        """The last acknowledged write of ``vm``'s guest to each block: block -> seq."""
        return dict(self._acked.get(vm, {}))

    def _current_image(self, vm: str) -> FakeImage | None:
        procs = self.running(vm) or sorted(self.processes(vm), key=lambda p: -p.pid)
        proc = procs[0] if procs else self._last_runner.get(vm)
        disk = proc.disk if proc is not None else None
        return disk.image if disk is not None else None

    def lost_writes(self, vm: str, *, host: str | None = None,
                    path: str | None = None) -> list[AckedWrite]:
        """The acknowledged writes of ``vm``'s guest that the image it uses does not
        hold (only the last write to each block counts: later ones overwrite it).

        The image checked: ``host``/``path`` if given (a missing file loses every
        write); else the first disk of the process whose guest runs now, else of its
        newest process, else of the last process that ran it.
        """
        if host is not None and path is not None:
            image = self.host(host).files.get(path)
        else:
            image = self._current_image(vm)
        lost = []
        for block, seq in sorted(self._acked.get(vm, {}).items()):
            found = parse_record(image.read_block(block)) if image is not None else None
            got = found[1] if found is not None and found[0] == vm else None
            if got != seq:
                lost.append(AckedWrite(seq, block, got))
        return lost

    # -- events ----------------------------------------------------------------------

    def _register(self, monitor: FakeMonitor) -> None:
        self._monitors.setdefault((monitor._host.name, monitor.vm), []).append(monitor)

    def _emit(self, vm: FakeVm, event: str, data: Mapping[str, object] | None = None) -> None:
        message: dict[str, object] = {
            "event": event, "data": dict(data or {}),
            "timestamp": {"seconds": int(self.time), "microseconds":
                          int((self.time % 1) * 1e6)}}
        for monitor in self._monitors.get((vm.host, vm.name), []):
            if monitor._pid == vm.pid:
                monitor._deliver(message)

    def _emit_migration(self, vm: FakeVm, status: str) -> None:
        if vm.capabilities.get("events", False):
            self._emit(vm, "MIGRATION", {"status": status})

    # -- migrations ------------------------------------------------------------------

    def _handshake_error(self, src: FakeVm, dest: FakeVm) -> str | None:
        """Why the destination refuses the source's stream (TLS, multifd, another machine
        type), or None."""
        s_tls, d_tls = str(src.params.get("tls-creds") or ""), str(
            dest.params.get("tls-creds") or "")
        if s_tls or d_tls:
            if not s_tls:
                return "the destination requires TLS and the source sent none"
            if not d_tls:
                return "TLS handshake failed: the destination does not expect TLS"
            s_obj, d_obj = src.objects.get(s_tls), dest.objects.get(d_tls)
            if not isinstance(s_obj, TlsObject) or s_obj.endpoint != "client":
                return f"No TLS credentials with id '{s_tls}' and a client endpoint"
            if not isinstance(d_obj, TlsObject) or d_obj.endpoint != "server":
                return f"No TLS credentials with id '{d_tls}' and a server endpoint"
        if src.capabilities.get("multifd", False) != dest.capabilities.get("multifd", False):
            return "multifd is enabled on one side only"
        if src.machine != dest.machine:  # QEMU's configuration section says so
            return (f"Machine type received is '{src.machine}' and local is "
                    f"'{dest.machine}'")
        return None

    def _start_migration(self, src: FakeVm, uri: str, address: str, port: int
                         ) -> FakeMigration:
        target = self._host_by_address(address, src.host)
        listener: FakeVm | None = None
        if target is not None:
            use = target.ports.get(port)
            candidate = next((p for p in target.vms.values() if use is not None
                              and p.pid == use.pid), None)
            if (use is not None and use.kind == "listen" and candidate is not None
                    and candidate.incoming_migration is None
                    and (use.address == address or use.address in _ANY
                         or (address in _LOOPBACK and use.address in _LOOPBACK))):
                listener = candidate
        profile = self.guest(src.name)
        sim = SimulatedMigration(
            ram=profile.ram, link_rate=self._default_rate, dirty_rate=profile.dirty_rate,
            wss=profile.wss, capabilities={k: v for k, v in src.capabilities.items() if v},
            params=sim_parameters(src.params), fast=True)
        if src.run_state != "running":
            sim.stop_guest()
        mig = FakeMigration(self, src, listener, uri, sim)
        self.migrations.append(mig)
        src.outgoing = mig
        self._emit_migration(src, "setup")
        if listener is None or target is None:
            mig.fail("Failed to connect socket: Connection refused")
            return mig
        refused = self._authz_refusal(listener, str(listener.params.get("tls-authz") or ""),
                                      src, str(src.params.get("tls-creds") or ""))
        if refused and listener.params.get("tls-creds"):
            # QEMU 7.2 drops a client its tls-authz refuses during the TLS handshake and
            # keeps listening: the destination waits for the right source, unaffected
            mig.dest = None
            mig.dest_status = "none"
            mig.fail(f"Unable to write to socket: Connection reset by peer ({refused})")
            return mig
        listener.incoming_migration = mig
        mig.target = (target.name, port)
        mig.settle()
        return mig

    # -- block jobs ------------------------------------------------------------------

    def _nbd_target(self, node: FakeNode) -> tuple[FakeVm, FakeExport, FakeImage] | str:
        """The export an NBD client node writes to, or why it cannot."""
        if node.broken is not None:
            return node.broken
        host = self.hosts.get(node.server_host or "")
        server = next((p for p in host.processes() if p.pid == node.server_pid), None) \
            if host is not None else None
        if server is None or not server.alive:
            return "Connection closed: the NBD server went away"
        if server.nbd is None:
            return "Connection closed: the NBD server stopped"
        export = server.nbd.by_name(node.export or "")
        if export is None:
            return f"the export {node.export!r} is gone"
        target = server.nodes.get(export.node)
        if target is None or target.image is None:
            return f"the export {node.export!r} has no image"
        return server, export, target.image

    def _step_job(self, vm: FakeVm, job: FakeJob) -> None:
        """One ``block_jobs()`` poll of a mirror: a piece copied (all that is left, when
        completing), ready once caught up; no progress over a cut link."""
        if job.status == "concluded":
            return
        target = vm.nodes.get(job.target)
        source = vm.nodes.get(job.device)
        resolved: tuple[FakeVm, FakeExport, FakeImage] | str = "the target node is gone"
        if target is not None:
            resolved = self._nbd_target(target)
        if source is None or source.image is None:
            resolved = "the source node is gone"
        if isinstance(resolved, str):
            self._conclude(vm, job, "failed", f"Input/output error: {resolved}")
            return
        server, _export, image = resolved
        if not self.link_is_up(vm.host, server.host):
            return
        if job.aborting:
            self._conclude(vm, job, "cancelled")
            return
        assert source is not None and source.image is not None
        budget = len(job.pending) if job.completing else self.mirror_piece
        for block in sorted(job.pending)[:budget]:
            if block < image.nblocks:
                image.write_block(block, source.image.read_block(block))
            job.offset += source.image.block_len(block)
            job.pending.discard(block)
        if not job.pending:
            if not job.ready:
                job.ready = True
                job.status = "ready"
                self._emit(vm, "BLOCK_JOB_READY", {"device": job.id, "type": "mirror",
                                                  "len": job.length, "offset": job.offset})
            if job.completing:
                self._conclude(vm, job, "completed")

    def _conclude(self, vm: FakeVm, job: FakeJob, outcome: str, error: str | None = None
                  ) -> None:
        job.status = "concluded"
        job.outcome = outcome
        job.error = error
        job.completing = job.aborting = False
        event = "BLOCK_JOB_CANCELLED" if outcome == "cancelled" else "BLOCK_JOB_COMPLETED"
        data: dict[str, object] = {"device": job.id, "type": "mirror", "len": job.length,
                                   "offset": job.offset}
        if error is not None:
            data["error"] = error
        self._emit(vm, event, data)

    def _cut(self, host: FakeHost, address: str, port: int) -> None:
        """``ss -K`` on ``host`` for ``address:port``: mirrors over it fail (an aborting
        one concludes), a migration stream over it breaks."""
        target = self._host_by_address(address, host.name)
        for vm in host.processes():
            for node in vm.nodes.values():
                if (node.kind != "nbd" or node.broken is not None or node.address is None
                        or node.address.port != port):
                    continue
                if node.address.host != address and (
                        target is None or node.server_host != target.name):
                    continue
                node.broken = "Connection reset by peer"
                for job in vm.jobs.values():
                    if job.target == node.name and job.status != "concluded":
                        if job.aborting:
                            self._conclude(vm, job, "cancelled")
                        else:
                            self._conclude(vm, job, "failed",
                                           "Input/output error: Connection reset by peer")
            mig = vm.outgoing
            if (mig is not None and not mig.ended and mig.target is not None
                    and target is not None and mig.target == (target.name, port)):
                mig.cut()

