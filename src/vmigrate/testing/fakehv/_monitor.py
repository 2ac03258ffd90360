"""The fake monitor: one VM's QMP, with QEMU 7.2's rules.

Every call first records itself and lets a tick pass, then the injected faults
are checked (a fault that hits changes nothing, unless it strikes ``after``),
then the monitor connects: an unreachable host or a VM without a process raises
:class:`~vmigrate.errors.QmpConnectionError`. A refused command raises
:class:`~vmigrate.errors.QmpCommandError` and changes nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from vmigrate.drivers.base import BlockJob, Monitor, NbdAddress, Sample
from vmigrate.errors import QmpCommandError, QmpConnectionError
from vmigrate.plan.simulate import SimulatedMigration
from vmigrate.qemu.cpu import QemuOffer
from vmigrate.qemu.spec import CpuSpec
from vmigrate.testing.fakehv._cluster import (
    KNOWN_CAPABILITIES,
    TLS_PARAMETERS,
    sim_parameters,
)
from vmigrate.testing.fakehv._faults import ControllerCrash, Fault
from vmigrate.testing.fakehv._migration import POSTCOPY, FakeMigration
from vmigrate.testing.fakehv._model import (
    AuthzObject,
    FakeBitmap,
    FakeExport,
    FakeJob,
    FakeNbdServer,
    FakeNode,
    FakeVm,
    PortUse,
    TlsObject,
)

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._cluster import FakeCluster
    from vmigrate.testing.fakehv._driver import FakeDriver

__all__ = ["FakeEventWaiter", "FakeMonitor", "parse_tcp_uri"]


def _refuse(message: str, error_class: str = "GenericError") -> QmpCommandError:
    return QmpCommandError(message, error_class)


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """``tcp:ADDR:PORT`` -> (ADDR, PORT); anything else is refused as QEMU does."""
    if not uri.startswith("tcp:"):
        raise _refuse(f"unknown migration protocol: {uri} (the fake speaks tcp: only)")
    address, sep, port = uri[4:].rpartition(":")
    address = address.strip("[]")
    if not sep or not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise _refuse(f"Invalid parameter 'uri': {uri!r} is not tcp:ADDRESS:PORT")
    return address, int(port)


class FakeEventWaiter:
    """Events a :meth:`FakeMonitor.events` block collected, oldest first."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self.queue: deque[dict[str, Any]] = deque()

    async def wait(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None at once when there is none (no real waiting)."""
        await asyncio.sleep(0)
        return self.queue.popleft() if self.queue else None


class FakeMonitor(Monitor):
    """A fake VM's QMP monitor (see the module doc). One per VM per driver; it
    follows whichever process of the VM runs on the host."""

    def __init__(self, cluster: FakeCluster, driver: FakeDriver, vm: str) -> None:
        self.cluster = cluster
        self.vm = vm
        self._host = cluster.hosts[driver.name]
        #: the process the monitor is connected to (None: disconnected)
        self._pid: int | None = None
        self._waiters: list[FakeEventWaiter] = []
        cluster._register(self)

    def __repr__(self) -> str:
        return f"FakeMonitor({self.vm!r} on {self._host.name!r})"

    @property
    def connected(self) -> bool:
        return self._pid is not None

    # -- plumbing ----------------------------------------------------------------------

    def _disconnect(self) -> None:
        """The connection is gone, and with it every event not yet read."""
        self._pid = None
        for waiter in self._waiters:
            waiter.queue.clear()

    def _deliver(self, message: Mapping[str, Any]) -> None:
        for waiter in self._waiters:
            if not waiter.names or message.get("event") in waiter.names:
                waiter.queue.append(dict(message))

    def _fault_error(self, fault: Fault, method: str) -> BaseException:
        where = f"{self.vm} on {self._host.name}: {method}"
        if fault.kind == "crash":
            self.cluster.restart_controller()
            return ControllerCrash(f"controller crashed at {where}")
        if fault.kind == "command":
            return _refuse(f"{where} failed: injected fault")
        if fault.kind == "timeout":  # no answer in time; the session stays
            return QmpConnectionError(f"{where}: no reply in time (injected)", timed_out=True)
        self._disconnect()
        return QmpConnectionError(f"{where}: monitor lost (injected {fault.kind})")

    def _connect(self) -> FakeVm:
        if not self._host.reachable:
            self._disconnect()
            raise QmpConnectionError(f"{self.vm}: host {self._host.name} does not answer")
        vm = self._host.vms.get(self.vm)
        if vm is None:
            self._disconnect()
            raise QmpConnectionError(f"{self.vm}: cannot connect to the QMP monitor on "
                                     f"{self._host.name}: no such process")
        if self._pid != vm.pid:
            self._disconnect()
            self._pid = vm.pid
        return vm

    @contextmanager
    def _op(self, method: str, *, seconds: float | None = None) -> Iterator[FakeVm]:
        hit = self.cluster._enter(self._host.name, self.vm, method, "monitor", seconds=seconds)
        if hit.before is not None:
            raise self._fault_error(hit.before, method)
        vm = self._connect()
        try:
            yield vm
        finally:
            self.cluster._check_split_brain()
        for fault in hit.after:
            if fault.kind == "cancel":
                if fault.on_cancel is not None:
                    fault.on_cancel()
            else:
                raise self._fault_error(fault, method)

    def _bind(self, vm: FakeVm, address: str, port: int, kind: str) -> None:
        host = self._host
        if not self.cluster._can_bind(host, address):
            raise _refuse(f"Failed to bind socket: Cannot assign requested address "
                          f"({address} is not an address of {host.name})")
        if port in host.ports:
            raise _refuse("Failed to bind socket: Address already in use")
        host.ports[port] = PortUse(kind, vm.name, vm.pid, address)

    # -- the guest ------------------------------------------------------------------

    async def version(self) -> tuple[int, int, int]:
        await asyncio.sleep(0)
        with self._op("version"):
            return self._host.qemu_version

    async def run_state(self, *, timeout: float | None = None) -> str:
        await asyncio.sleep(0)
        with self._op("run_state") as vm:
            return vm.run_state

    async def pause(self) -> None:
        """``stop``: a running guest pauses; an incoming one will stay paused when its
        migration completes; otherwise nothing changes."""
        await asyncio.sleep(0)
        with self._op("pause") as vm:
            if vm.run_state == "inmigrate":
                vm.held = True
            elif vm.run_state == "running":
                self.cluster._set_run_state(vm, "paused")
                if vm.outgoing is not None and vm.outgoing.status == "active":
                    vm.outgoing.sim.stop_guest()

    async def resume(self) -> None:
        """``cont``: refused in ``shutdown`` (reset first), in ``finish-migrate``, and when
        the disks cannot be taken (a writable export open, another process holding the
        image): then nothing changed. An incoming VM starts when its migration ends."""
        await asyncio.sleep(0)
        with self._op("resume") as vm:
            state = vm.run_state
            if state in ("shutdown", "internal-error", "guest-panicked"):
                raise _refuse("Resetting the Virtual Machine is required")
            if state == "finish-migrate":
                raise _refuse("Migration is not finalized yet")
            if state == "inmigrate":
                vm.held = False
                return
            if state == "running":
                return
            problem = self.cluster._activate(vm)
            if problem is not None:
                raise _refuse(problem)
            vm.held = False
            self.cluster._set_run_state(vm, "running")
            if vm.outgoing is not None and vm.outgoing.status == "active":
                vm.outgoing.sim.paused_at = None

    async def quit(self) -> None:
        await asyncio.sleep(0)
        with self._op("quit") as vm:
            self.cluster._exit(vm, "host-qmp-quit")

    async def powerdown(self) -> None:
        """``system_powerdown``: an ACPI guest powers off a few ticks later, once it
        runs (a paused guest handles the button when it is resumed)."""
        await asyncio.sleep(0)
        with self._op("powerdown") as vm:
            self.cluster._emit(vm, "POWERDOWN")
            if vm.powerdown_at is None:
                vm.powerdown_at = self.cluster.tick + self.cluster.acpi_ticks

    async def reset(self) -> None:
        await asyncio.sleep(0)
        with self._op("reset") as vm:
            self.cluster._reset(vm)

    async def set_shutdown_action(self, action: Literal["poweroff", "pause"]) -> None:
        await asyncio.sleep(0)
        with self._op("set_shutdown_action") as vm:
            if action not in ("poweroff", "pause"):
                raise _refuse(f"Parameter 'shutdown' does not accept value '{action}'")
            vm.shutdown_action = action

    async def announce(self, *, initial_ms: int, max_ms: int, rounds: int,
                       step_ms: int) -> None:
        await asyncio.sleep(0)
        with self._op("announce") as vm:
            vm.announcements.append({"initial_ms": initial_ms, "max_ms": max_ms,
                                     "rounds": rounds, "step_ms": step_ms})

    # -- the guest's hardware --------------------------------------------------------

    async def machine_type(self) -> str:
        """The versioned type the process resolved its machine to when it started."""
        await asyncio.sleep(0)
        with self._op("machine_type") as vm:
            return vm.machine

    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        """What the process's QEMU offers: the host's when it started (``FakeVm.qemu``)."""
        await asyncio.sleep(0)
        with self._op("qemu_offer") as vm:
            return (vm.qemu or self._host.qemu).offer(cpus)

    # -- migration -------------------------------------------------------------------

    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        """Refused while a migration from or into the VM runs, for an unknown name, or
        for a combination QEMU 7.2 refuses (compress with post-copy, postcopy-preempt
        without post-copy, zero-copy-send without multifd)."""
        await asyncio.sleep(0)
        with self._op("set_capabilities") as vm:
            if vm.migrating:
                raise _refuse("There's a migration process in progress")
            for name, value in caps.items():
                if name not in KNOWN_CAPABILITIES:
                    raise _refuse(f"Invalid parameter '{name}'")
                if not isinstance(value, bool):
                    raise _refuse(f"Invalid parameter type for 'state', expected: boolean "
                                  f"({name})")
            merged = {**vm.capabilities, **caps}
            if merged["postcopy-ram"] and merged["compress"]:
                raise _refuse("Postcopy is not currently compatible with compression")
            if merged["postcopy-preempt"] and not merged["postcopy-ram"]:
                raise _refuse("Postcopy preempt requires postcopy-ram")
            if merged["zero-copy-send"] and not merged["multifd"]:
                raise _refuse("Zero copy only available with multifd migration")
            vm.capabilities = merged

    async def set_parameters(self, params: Mapping[str, object]) -> None:
        """Range-checked as QEMU 7.2 (through :class:`SimulatedMigration`); applies to a
        running migration too. A refusal changes no parameter."""
        await asyncio.sleep(0)
        with self._op("set_parameters") as vm:
            physics: dict[str, object] = {}
            other: dict[str, object] = {}
            for name, value in params.items():
                if name in TLS_PARAMETERS:
                    if not isinstance(value, str):
                        raise _refuse(f"Invalid parameter type for '{name}', expected: string")
                    other[name] = value
                elif name == "xbzrle-cache-size":
                    if not isinstance(value, int) or isinstance(value, bool) or \
                            value < 4096 or value & (value - 1):
                        raise _refuse("Parameter 'xbzrle_cache_size' expects a power of two "
                                      "no less than the target page size")
                    other[name] = value
                else:
                    physics[name] = value
            probe = SimulatedMigration(ram=1, link_rate=1.0, params=sim_parameters(vm.params))
            probe.set_parameters(physics)
            mig = vm.outgoing
            if mig is not None and not mig.ended:
                mig.sim.set_parameters(physics)
            vm.params.update(probe.params)
            vm.params.update(other)

    async def add_tls(self, obj_id: str, directory: str,
                      endpoint: Literal["client", "server"]) -> None:
        """``object-add tls-creds-x509``: refused for a taken id or when the host lacks
        the credential files in ``directory``."""
        await asyncio.sleep(0)
        with self._op("add_tls") as vm:
            if obj_id in vm.objects:
                raise _refuse(f"attempt to add duplicate property '{obj_id}' to object "
                              f"(type 'container')")
            if endpoint not in ("client", "server"):
                raise _refuse(f"Invalid parameter 'endpoint': {endpoint}")
            directory = directory.rstrip("/") or "/"
            for name in ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem"):
                path = f"{directory}/{name}"
                if path not in self._host.files:
                    raise _refuse(f"Unable to access credentials {path}: No such file or "
                                  f"directory")
            vm.objects[obj_id] = TlsObject(obj_id, directory, endpoint)

    async def add_authz(self, obj_id: str, identity: str) -> None:
        """``object-add authz-simple``: refused for a taken id."""
        await asyncio.sleep(0)
        with self._op("add_authz") as vm:
            if obj_id in vm.objects:
                raise _refuse(f"attempt to add duplicate property '{obj_id}' to object "
                              f"(type 'container')")
            vm.objects[obj_id] = AuthzObject(obj_id, identity)

    async def remove_object(self, obj_id: str) -> None:
        await asyncio.sleep(0)
        with self._op("remove_object") as vm:
            if obj_id not in vm.objects:
                raise _refuse(f"object '{obj_id}' not found")
            del vm.objects[obj_id]

    async def listen(self, uri: str) -> None:
        """``migrate-incoming``: only on a VM started incoming and not yet listening; a
        bind that fails (taken port, foreign address) may be retried."""
        await asyncio.sleep(0)
        with self._op("listen") as vm:
            if not vm.incoming or vm.run_state != "inmigrate":
                raise _refuse("'-incoming' was not specified on the command line")
            if vm.listen_uri is not None or vm.incoming_migration is not None:
                raise _refuse("The incoming migration has already been started")
            address, port = parse_tcp_uri(uri)
            self._bind(vm, address, port, "listen")
            vm.listen_uri = uri

    async def listen_recover(self, uri: str) -> None:
        """``migrate-recover``: only on a destination in ``postcopy-paused``."""
        await asyncio.sleep(0)
        with self._op("listen_recover") as vm:
            mig = vm.incoming_migration
            if mig is None or mig.ended or mig.dest_status != "postcopy-paused":
                raise _refuse("Migrate recover can only be run when postcopy is paused.")
            if vm.recover_uri is not None:
                raise _refuse("Migrate recovery is triggered already")
            address, port = parse_tcp_uri(uri)
            self._bind(vm, address, port, "recover")
            vm.recover_uri = uri

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        """``migrate``: refused on an incoming VM, while a migration runs, or for a bad
        URI. Nobody listening on exactly ``uri`` (or a failed handshake: TLS, multifd)
        is not refused: the migration then reports ``failed``, as QEMU's does.
        ``resume``: only in ``postcopy-paused``; it goes on if the destination listens
        for the recovery on ``uri``, else it stays paused."""
        await asyncio.sleep(0)
        with self._op("migrate") as vm:
            if resume:
                mig = vm.outgoing
                if mig is None or mig.status != "postcopy-paused":
                    raise _refuse("Cannot resume if there is no paused migration")
                address, port = parse_tcp_uri(uri)
                target = self.cluster._host_by_address(address, vm.host)
                if target is not None:
                    mig.resume(target.name, port)
                return
            if vm.incoming or vm.run_state == "inmigrate":
                raise _refuse("Guest is waiting for an incoming migration")
            if vm.outgoing is not None and not vm.outgoing.ended:
                raise _refuse("There's a migration process in progress")
            address, port = parse_tcp_uri(uri)
            self.cluster._start_migration(vm, uri, address, port)

    async def migration(self, *, timeout: float | None = None) -> Sample:
        """``query-migrate``; each call runs the migration ``sample_s`` simulated
        seconds on (from either end). The destination reports its status only."""
        await asyncio.sleep(0)
        with self._op("migration", seconds=self.cluster.sample_s) as vm:
            sides: tuple[tuple[FakeMigration | None, Literal["source", "dest"]], ...] = (
                (vm.outgoing, "source"), (vm.incoming_migration, "dest"))
            for mig, side in sides:
                if mig is None:
                    continue
                if not mig.ended:
                    mig.advance(self.cluster.sample_s)
                return Sample.from_query_migrate(0.0, mig.reply(side))
            if vm.listen_uri is not None:
                return Sample.from_query_migrate(0.0, {"status": "setup"})
            return Sample.from_query_migrate(0.0, {})

    async def cancel_migration(self) -> None:
        """``migrate_cancel``: before the switch the migration is cancelled (the source
        guest runs on if it ran, the incoming QEMU exits); refused after the switch to
        post-copy; nothing to do otherwise."""
        await asyncio.sleep(0)
        with self._op("cancel_migration") as vm:
            mig = vm.outgoing
            if mig is None or mig.ended:
                return
            if mig.status in POSTCOPY:
                raise _refuse("migrate_cancel after the switch to post-copy: the guest runs "
                              "on the destination (refused by the fake)")
            mig.cancel()

    async def continue_migration(self, state: str) -> None:
        await asyncio.sleep(0)
        with self._op("continue_migration") as vm:
            mig = vm.outgoing
            status = "none" if mig is None else mig.status
            if mig is None or status != state or state != "pre-switchover":
                raise _refuse(f"Migration not in expected state: {status}")
            mig.continue_()

    async def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: needs ``postcopy-ram`` on both ends and a started
        migration; the switch happens as soon as the migration is active."""
        await asyncio.sleep(0)
        with self._op("start_postcopy") as vm:
            if not vm.capabilities.get("postcopy-ram", False):
                raise _refuse("Enable postcopy with migrate_set_capability before the start "
                              "of migration")
            mig = vm.outgoing
            if mig is None:
                raise _refuse("Postcopy must be started after migration has been started")
            if mig.dest is not None and not mig.dest.capabilities.get("postcopy-ram", False):
                raise _refuse("postcopy-ram is not enabled on the destination")
            mig.request_postcopy()

    async def pause_migration(self, *, timeout: float | None = None) -> None:
        """``migrate-pause``: only in ``postcopy-active`` (on either end)."""
        await asyncio.sleep(0)
        with self._op("pause_migration") as vm:
            out, inc = vm.outgoing, vm.incoming_migration
            if out is not None and not out.ended:
                if out.status != "postcopy-active":
                    raise _refuse("migrate-pause is currently only supported during "
                                  "postcopy-active state")
                out.pause("source")
                return
            if inc is not None and not inc.ended and inc.dest_status == "postcopy-active":
                inc.pause("dest")
                return
            raise _refuse("migrate-pause is currently only supported during postcopy-active "
                          "state")

    @contextmanager
    def events(self, *names: str) -> Iterator[FakeEventWaiter]:
        """Collect the named events (none named: all) while the block runs; only those
        sent while the monitor is connected, and a lost connection drops them. Not a
        recorded call (it cannot fail)."""
        waiter = FakeEventWaiter(names)
        self._waiters.append(waiter)
        try:
            yield waiter
        finally:
            self._waiters.remove(waiter)

    # -- block devices, NBD, bitmaps --------------------------------------------------

    def _node(self, vm: FakeVm, name: str) -> FakeNode:
        node = vm.nodes.get(name)
        if node is None:
            raise _refuse(f"Cannot find device={name} nor node-name={name}")
        return node

    def _bitmap_busy(self, vm: FakeVm, node: str, name: str) -> bool:
        return any(e.node == node and name in e.bitmaps for e in vm.exports.values())

    async def nbd_server_start(self, address: NbdAddress, *, tls_id: str | None = None,
                               tls_authz: str | None = None,
                               max_connections: int | None = None) -> None:
        """``nbd-server-start``; as QEMU 7.2, ``tls_authz`` is looked up only when a
        client connects, and ``tls_authz`` without ``tls_id`` is refused."""
        await asyncio.sleep(0)
        with self._op("nbd_server_start") as vm:
            if vm.nbd is not None:
                raise _refuse("NBD server already running")
            if tls_id is not None:
                creds = vm.objects.get(tls_id)
                if creds is None:
                    raise _refuse(f"No TLS credentials with id '{tls_id}'")
                if not isinstance(creds, TlsObject) or creds.endpoint != "server":
                    raise _refuse("Expecting TLS credentials with a server endpoint")
            elif tls_authz is not None:
                raise _refuse("TLS authorization is incompatible with a non-TLS server")
            if max_connections is not None and max_connections < 0:
                raise _refuse("max-connections must be a non-negative number")
            if address.unix is not None:
                if address.unix in self._host.sockets:
                    raise _refuse(f"Failed to bind socket to {address.unix}: Address already "
                                  f"in use")
                self._host.sockets[address.unix] = PortUse("nbd", vm.name, vm.pid,
                                                           address.unix)
            else:
                assert address.host is not None and address.port is not None
                self._bind(vm, address.host, address.port, "nbd")
            vm.nbd = FakeNbdServer(address, tls_id, tls_authz=tls_authz,
                                   max_connections=max_connections or None)

    async def nbd_server_stop(self) -> None:
        """Stops the server and removes its exports (clients lose their connection)."""
        await asyncio.sleep(0)
        with self._op("nbd_server_stop") as vm:
            if vm.nbd is None:
                raise _refuse("NBD server not running")
            self.cluster._release_port(vm, kind="nbd")
            if vm.nbd.address.unix is not None:
                self._host.sockets.pop(vm.nbd.address.unix, None)
            vm.nbd = None

    async def export_add(self, export_id: str, node: str, name: str, *, writable: bool,
                         bitmaps: Sequence[str] = ()) -> None:
        """``block-export-add``: refused without a server, for a taken id or name, an
        unknown node, a writable export of a disk the guest device holds (active), an
        unknown bitmap, or an enabled bitmap on a read-only export."""
        await asyncio.sleep(0)
        with self._op("export_add") as vm:
            if vm.nbd is None:
                raise _refuse("NBD server not running")
            if export_id in vm.nbd.exports:
                raise _refuse(f"Block export id '{export_id}' is already in use")
            if vm.nbd.by_name(name) is not None:
                raise _refuse(f"NBD server already has export named '{name}'")
            target = self._node(vm, node)
            if target.image is None:
                raise _refuse(f"the fake exports disk nodes only, not {node}")
            if writable:
                if not target.writable:
                    raise _refuse(f"Block node '{node}' is read-only")
                if target.active:
                    raise _refuse(f"Conflicts with use by {node} as 'root', which does not "
                                  f"allow 'write' on {node}")
            for bitmap in bitmaps:
                found = vm.bitmaps.get((node, bitmap))
                if found is None:
                    raise _refuse(f"Bitmap '{bitmap}' is not found")
                if found.enabled and not writable and target.writable and target.active:
                    raise _refuse(f"Enabled bitmap '{bitmap}' incompatible with readonly "
                                  f"export")
            vm.nbd.exports[export_id] = FakeExport(export_id, name, node, writable,
                                                   tuple(bitmaps))

    async def export_del(self, export_id: str) -> None:
        """``block-export-del`` (safe mode): refused while an NBD client is connected."""
        await asyncio.sleep(0)
        with self._op("export_del") as vm:
            if vm.nbd is None or export_id not in vm.nbd.exports:
                raise _refuse(f"Export '{export_id}' is not found")
            export = vm.nbd.exports[export_id]
            for proc in self.cluster._all_processes():
                for client in proc.nodes.values():
                    if (client.kind == "nbd" and client.server_pid == vm.pid
                            and client.export == export.name and client.broken is None):
                        raise _refuse(f"export '{export_id}' still in use")
            del vm.nbd.exports[export_id]

    async def nbd_client_add(self, node: str, address: NbdAddress, export: str, *,
                             tls_id: str | None = None) -> None:
        """``blockdev-add`` of an NBD client (read-write): refused for a taken node name,
        nobody listening, a cut link, a TLS mismatch, an unknown or read-only export."""
        await asyncio.sleep(0)
        with self._op("nbd_client_add") as vm:
            if node in vm.nodes:
                raise _refuse(f"Duplicate nodes with node-name='{node}'")
            if tls_id is not None:
                creds = vm.objects.get(tls_id)
                if creds is None:
                    raise _refuse(f"No TLS credentials with id '{tls_id}'")
                if not isinstance(creds, TlsObject) or creds.endpoint != "client":
                    raise _refuse("Expecting TLS credentials with a client endpoint")
            where = address.unix or f"{address.host}:{address.port}"
            server: FakeVm | None = None
            if address.unix is not None:
                use = self._host.sockets.get(address.unix)
                host = self._host
            else:
                assert address.host is not None and address.port is not None
                found = self.cluster._host_by_address(address.host, vm.host)
                host = found if found is not None else self._host
                use = found.ports.get(address.port) if found is not None else None
            if use is not None and use.kind == "nbd":
                server = next((p for p in host.processes() if p.pid == use.pid), None)
            if server is None or server.nbd is None:
                raise _refuse(f"Failed to connect to '{where}': Connection refused")
            if not self.cluster.link_is_up(vm.host, server.host):
                raise _refuse(f"Failed to connect to '{where}': Connection timed out")
            if server.nbd.tls_id is not None and tls_id is None:
                raise _refuse("TLS negotiation required before option 8 (structured reply)")
            if server.nbd.tls_id is None and tls_id is not None:
                raise _refuse("Server don't support STARTTLS option")
            limit = server.nbd.max_connections
            if limit is not None and self.cluster._nbd_clients(server) >= limit:
                # QEMU stops listening while the server is full
                raise _refuse(f"Failed to connect to '{where}': Connection refused")
            refused = self.cluster._authz_refusal(server, server.nbd.tls_authz, vm, tls_id)
            if refused:
                raise _refuse(f"Failed to read option reply: Cannot read from TLS channel: "
                              f"Software caused connection abort ({refused})")
            found_export = server.nbd.by_name(export)
            if found_export is None:
                raise _refuse(f"Requested export not available: {export}")
            if not found_export.writable:
                raise _refuse(f"Block node is read-only (export {export})")
            vm.nodes[node] = FakeNode(node, "nbd", address=address, export=export,
                                      server_host=server.host, server_pid=server.pid,
                                      tls_id=tls_id)

    async def node_del(self, node: str) -> None:
        await asyncio.sleep(0)
        with self._op("node_del") as vm:
            found = vm.nodes.get(node)
            if found is None:
                raise _refuse(f"Failed to find node with node-name='{node}'")
            if found.kind == "disk":
                raise _refuse(f"Node '{node}' is busy: node is used as guest device")
            for job in vm.jobs.values():
                if job.status != "concluded" and node in (job.device, job.target):
                    raise _refuse(f"Node '{node}' is busy: block device is in use by block "
                                  f"job: mirror")
            del vm.nodes[node]

    async def mirror(self, job: str, device: str, target: str, *,
                     speed: int | None = None) -> None:
        """``blockdev-mirror`` (sync full) of an active disk into an NBD client node of
        the same size."""
        await asyncio.sleep(0)
        with self._op("mirror") as vm:
            if job in vm.jobs:
                raise _refuse(f"Job ID '{job}' already in use")
            source = self._node(vm, device)
            dest = self._node(vm, target)
            if source.kind != "disk" or source.image is None:
                raise _refuse(f"the fake mirrors disk nodes only, not {device}")
            if dest.kind != "nbd":
                raise _refuse(f"the fake mirrors into NBD client nodes only, not {target}")
            if not source.active:
                raise _refuse(f"Cannot mirror from inactive node {device}")
            for other in vm.jobs.values():
                if other.status != "concluded" and ({other.device, other.target}
                                                    & {device, target}):
                    raise _refuse(f"Node '{device}' is busy: block device is in use by "
                                  f"block job: mirror")
            image = source.image
            resolved = self.cluster._nbd_target(dest)
            if not isinstance(resolved, str) and resolved[2].size != image.size:
                raise _refuse("Source and target image have different sizes")
            vm.jobs[job] = FakeJob(job, device, target, length=image.size,
                                   pending=set(range(image.nblocks)))

    async def block_jobs(self, *, timeout: float | None = None) -> list[BlockJob]:
        """``query-block-jobs``; each call moves every mirror of the VM on by a piece."""
        await asyncio.sleep(0)
        with self._op("block_jobs") as vm:
            for job in list(vm.jobs.values()):
                self.cluster._step_job(vm, job)
            return [BlockJob(j.id, j.status, j.ready, j.offset, j.length, j.error)
                    for j in vm.jobs.values()]

    async def cancel_block_job(self, job: str, *, force: bool = False) -> None:
        """A ready mirror without ``force`` completes at the next poll (the target then
        equals the source); otherwise the job aborts (over a cut link it stays
        ``aborting`` until the link is back or its connection is cut)."""
        await asyncio.sleep(0)
        with self._op("cancel_block_job") as vm:
            found = vm.jobs.get(job)
            if found is None:
                raise _refuse(f"Block job '{job}' not found", "DeviceNotActive")
            if found.status == "concluded":
                raise _refuse(f"Job '{job}' in state 'concluded' cannot accept command verb "
                              f"'cancel'")
            if force or not found.ready:
                found.aborting = True
                found.completing = False
                found.status = "aborting"
            else:
                found.completing = True

    async def dismiss_job(self, job: str) -> None:
        await asyncio.sleep(0)
        with self._op("dismiss_job") as vm:
            found = vm.jobs.get(job)
            if found is None:
                raise _refuse(f"Job '{job}' not found")
            if found.status != "concluded":
                raise _refuse(f"Job '{job}' in state '{found.status}' cannot accept command "
                              f"verb 'dismiss'")
            del vm.jobs[job]

    async def bitmaps_transaction(self, add: Sequence[tuple[str, str]],
                                  disable: Sequence[tuple[str, str]] = ()) -> None:
        """All or nothing: every action is checked before any is applied."""
        await asyncio.sleep(0)
        with self._op("bitmaps_transaction") as vm:
            new: dict[tuple[str, str], FakeBitmap] = {}
            for node, name in add:
                self._node(vm, node)
                if (node, name) in vm.bitmaps or (node, name) in new:
                    raise _refuse(f"Bitmap already exists: {name}")
                new[(node, name)] = FakeBitmap(node, name)
            for node, name in disable:
                if (node, name) not in vm.bitmaps and (node, name) not in new:
                    raise _refuse(f"Dirty bitmap '{name}' not found")
                if self._bitmap_busy(vm, node, name):
                    raise _refuse(f"Bitmap '{name}' is currently in use by another operation "
                                  f"and cannot be used")
            vm.bitmaps.update(new)
            for key in disable:
                vm.bitmaps[key].enabled = False

    async def disable_bitmap(self, node: str, name: str) -> None:
        await asyncio.sleep(0)
        with self._op("disable_bitmap") as vm:
            bitmap = self._bitmap(vm, node, name)
            bitmap.enabled = False

    async def remove_bitmap(self, node: str, name: str) -> None:
        await asyncio.sleep(0)
        with self._op("remove_bitmap") as vm:
            self._bitmap(vm, node, name)
            del vm.bitmaps[(node, name)]

    def _bitmap(self, vm: FakeVm, node: str, name: str) -> FakeBitmap:
        self._node(vm, node)
        bitmap = vm.bitmaps.get((node, name))
        if bitmap is None:
            raise _refuse(f"Dirty bitmap '{name}' not found")
        if self._bitmap_busy(vm, node, name):
            raise _refuse(f"Bitmap '{name}' is currently in use by another operation and "
                          f"cannot be used")
        return bitmap

    async def close(self) -> None:
        self._disconnect()
