"""The QEMU driver: VMs are QEMU processes vmigrate started itself, reached over the
host's transport (SSH or local) and their QMP monitor.

Process lifecycle, argv and images come from :mod:`vmigrate.qemu`; this module
turns them into the :class:`~vmigrate.drivers.base.Driver` seam and keeps one QMP
session per VM (QEMU's monitor takes one client at a time, so everything this
driver does with a VM goes through that session).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Literal

from vmigrate.config import HostConfig
from vmigrate.drivers.base import BlockJob, Driver, EventWaiter, Monitor, NbdAddress
from vmigrate.errors import (
    HostError,
    HostKeyError,
    QmpCommandError,
    QmpConnectionError,
    QmpError,
)
from vmigrate.hosts import Host, open_host
from vmigrate.pki import CA_CERT, CLIENT_CERT, QEMU_FILES, SERVER_CERT, TlsFiles
from vmigrate.plan.convergence import Sample
from vmigrate.qemu import images, probe, process
from vmigrate.qemu.cpu import QemuOffer
from vmigrate.qemu.images import ImageFormat, ImageInfo
from vmigrate.qemu.process import VmState
from vmigrate.qemu.qmp import QmpSession, qmp_session
from vmigrate.qemu.spec import CpuSpec, VMSpec

#: a monitor that does not answer a command within this long is taken as lost
DEFAULT_TIMEOUT_S = 20.0


class _NoEvents:
    """The waiter of a monitor that is not connected: it only waits."""

    async def wait(self, timeout: float) -> dict[str, Any] | None:
        await asyncio.sleep(timeout)
        return None


class QemuMonitor(Monitor):
    """QMP on the VM's socket, through its host; connects on first use and again
    after a lost connection."""

    def __init__(self, host: Host, socket_path: str, vm: str) -> None:
        self.host = host
        self.socket_path = socket_path
        self.vm = vm
        self._stack: AsyncExitStack | None = None
        self._session: QmpSession | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> QmpSession:
        async with self._lock:
            if self._session is not None:
                return self._session
            stack = AsyncExitStack()
            try:
                session = await stack.enter_async_context(
                    qmp_session(self.host, self.socket_path, vm=self.vm))
            except BaseException:
                await stack.aclose()
                raise
            self._stack, self._session = stack, session
            return session

    async def close(self) -> None:
        stack, self._stack, self._session = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _run(self, command: str, arguments: Mapping[str, object] | None = None, *,
                   oob: bool = False, timeout: float | None = None) -> Any:
        session = await self._connect()
        try:
            return await session.execute(command, arguments, oob=oob,
                                         timeout=timeout or DEFAULT_TIMEOUT_S)
        except QmpConnectionError as exc:
            if not exc.timed_out:
                # gone: the next call connects again. A command that only timed out
                # keeps the session: QEMU's main loop may be blocked (a post-copy page
                # fault), and connecting anew would need that very loop, while
                # out-of-band commands still get through this one
                await self.close()
            raise

    # -- the guest

    async def version(self) -> tuple[int, int, int]:
        ver = (await self._run("query-version"))["qemu"]
        return int(ver["major"]), int(ver["minor"]), int(ver["micro"])

    async def run_state(self, *, timeout: float | None = None) -> str:
        return str((await self._run("query-status", timeout=timeout))["status"])

    async def pause(self) -> None:
        await self._run("stop")

    async def resume(self) -> None:
        await self._run("cont")

    async def quit(self) -> None:
        with contextlib.suppress(QmpError):
            await self._run("quit", timeout=10)
        await self.close()

    async def powerdown(self) -> None:
        await self._run("system_powerdown")

    async def reset(self) -> None:
        await self._run("system_reset")

    async def set_shutdown_action(self, action: Literal["poweroff", "pause"]) -> None:
        await self._run("set-action", {"shutdown": action})

    async def announce(self, *, initial_ms: int, max_ms: int, rounds: int,
                       step_ms: int) -> None:
        await self._run("announce-self", {"initial": initial_ms, "max": max_ms,
                                          "rounds": rounds, "step": step_ms})

    # -- the guest's hardware

    async def machine_type(self) -> str:
        # the machine object's QOM type: "pc-i440fx-7.2-machine"
        qom = str(await self._run("qom-get", {"path": "/machine", "property": "type"}))
        return qom.removesuffix("-machine")

    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        kvm = await self._run("query-kvm")
        replies: dict[str, Mapping[str, Any]] = {}
        for qid, command, args in probe.queries(cpus):
            try:
                replies[qid] = {"return": await self._run(command, args)}
            except QmpCommandError as exc:
                if not qid.startswith("x:"):
                    raise
                replies[qid] = {"error": {"desc": str(exc)}}
        accel = "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "tcg"
        return probe.offer_from_replies(replies, cpus, accel)

    # -- migration

    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        if caps:
            await self._run("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": v} for k, v in caps.items()]})

    async def set_parameters(self, params: Mapping[str, object]) -> None:
        if params:
            await self._run("migrate-set-parameters", dict(params))

    async def add_tls(self, obj_id: str, directory: str,
                      endpoint: Literal["client", "server"]) -> None:
        await self._run("object-add", {"qom-type": "tls-creds-x509", "id": obj_id,
                                       "dir": directory, "endpoint": endpoint,
                                       "verify-peer": True})

    async def add_authz(self, obj_id: str, identity: str) -> None:
        await self._run("object-add", {"qom-type": "authz-simple", "id": obj_id,
                                       "identity": identity})

    async def remove_object(self, obj_id: str) -> None:
        await self._run("object-del", {"id": obj_id})

    async def listen(self, uri: str) -> None:
        await self._run("migrate-incoming", {"uri": uri})

    async def listen_recover(self, uri: str) -> None:
        await self._run("migrate-recover", {"uri": uri}, oob=True)

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        args: dict[str, object] = {"uri": uri}
        if resume:
            args["resume"] = True
        await self._run("migrate", args)

    async def migration(self, *, timeout: float | None = None) -> Sample:
        return Sample.from_query_migrate(0.0, await self._run("query-migrate", timeout=timeout))

    async def cancel_migration(self) -> None:
        await self._run("migrate_cancel")

    async def continue_migration(self, state: str) -> None:
        await self._run("migrate-continue", {"state": state})

    async def start_postcopy(self) -> None:
        await self._run("migrate-start-postcopy")

    async def pause_migration(self, *, timeout: float | None = None) -> None:
        await self._run("migrate-pause", oob=True, timeout=timeout)

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventWaiter]:
        session = self._session
        if session is None:
            yield _NoEvents()
            return
        with session.events(*names) as waiter:
            yield waiter

    # -- block

    async def nbd_server_start(self, address: NbdAddress, *, tls_id: str | None = None,
                               tls_authz: str | None = None,
                               max_connections: int | None = None) -> None:
        addr: dict[str, object]
        if address.unix is not None:
            addr = {"type": "unix", "data": {"path": address.unix}}
        else:
            addr = {"type": "inet", "data": {"host": address.host, "port": str(address.port)}}
        args: dict[str, object] = {"addr": addr}
        if tls_id:
            args["tls-creds"] = tls_id
        if tls_authz:
            args["tls-authz"] = tls_authz
        if max_connections is not None:
            args["max-connections"] = max_connections
        await self._run("nbd-server-start", args)

    async def nbd_server_stop(self) -> None:
        await self._run("nbd-server-stop")

    async def export_add(self, export_id: str, node: str, name: str, *, writable: bool,
                         bitmaps: Sequence[str] = ()) -> None:
        args: dict[str, object] = {"type": "nbd", "id": export_id, "node-name": node,
                                   "name": name, "writable": writable}
        if bitmaps:
            args["bitmaps"] = list(bitmaps)
        await self._run("block-export-add", args)

    async def export_del(self, export_id: str) -> None:
        await self._run("block-export-del", {"id": export_id})

    async def nbd_client_add(self, node: str, address: NbdAddress, export: str, *,
                             tls_id: str | None = None) -> None:
        server: dict[str, object]
        if address.unix is not None:
            server = {"type": "unix", "path": address.unix}
        else:
            server = {"type": "inet", "host": address.host, "port": str(address.port)}
        # discard=unmap: the mirror writes holes as zeroes that may unmap
        args: dict[str, object] = {"driver": "nbd", "node-name": node, "server": server,
                                   "export": export, "discard": "unmap"}
        if tls_id:
            args["tls-creds"] = tls_id
        await self._run("blockdev-add", args)

    async def node_del(self, node: str) -> None:
        await self._run("blockdev-del", {"node-name": node})

    async def mirror(self, job: str, device: str, target: str, *,
                     speed: int | None = None) -> None:
        args: dict[str, object] = {"job-id": job, "device": device, "target": target,
                                   "sync": "full", "auto-dismiss": False}
        if speed is not None:
            args["speed"] = max(1, int(speed))
        await self._run("blockdev-mirror", args)

    async def block_jobs(self, *, timeout: float | None = None) -> list[BlockJob]:
        reply = await self._run("query-block-jobs", timeout=timeout)
        return [BlockJob(id=str(j.get("device")), status=str(j.get("status")),
                         ready=bool(j.get("ready")), offset=int(j.get("offset") or 0),
                         length=int(j.get("len") or 0), error=j.get("error") or None)
                for j in reply if isinstance(j, dict) and "device" in j]

    async def cancel_block_job(self, job: str, *, force: bool = False) -> None:
        await self._run("block-job-cancel", {"device": job, "force": force})

    async def dismiss_job(self, job: str) -> None:
        await self._run("job-dismiss", {"id": job})

    async def bitmaps_transaction(self, add: Sequence[tuple[str, str]],
                                  disable: Sequence[tuple[str, str]] = ()) -> None:
        actions: list[dict[str, object]] = [
            {"type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": name, "granularity": 65536, "persistent": False}}
            for node, name in add]
        actions += [{"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}
                    for node, name in disable]
        await self._run("transaction", {"actions": actions})

    async def disable_bitmap(self, node: str, name: str) -> None:
        await self._run("block-dirty-bitmap-disable", {"node": node, "name": name})

    async def remove_bitmap(self, node: str, name: str) -> None:
        await self._run("block-dirty-bitmap-remove", {"node": node, "name": name})


class QemuDriver(Driver):
    """A host whose VMs are QEMU processes vmigrate started (see the module doc)."""

    def __init__(self, config: HostConfig, host: Host | None = None) -> None:
        super().__init__(config)
        self.host = host if host is not None else open_host(config)
        self._monitors: dict[str, QemuMonitor] = {}

    # -- the host

    async def check_reachable(self) -> None:
        await self.host.run(["true"], timeout=20)

    async def can_reach(self, address: str) -> bool:
        res = await self.host.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False)
        return res.status == 0

    async def cut_connections(self, address: str, port: int) -> None:
        await self.host.run(["ss", "-K", "dst", address, "dport", "=", f":{int(port)}"],
                            check=False)

    async def missing(self, paths: Sequence[str]) -> list[str]:
        return await self.host.missing(paths)

    async def tls_missing(self) -> list[str]:
        return await self.host.missing([f"{self.config.tls_path}/{f}" for f in QEMU_FILES])

    async def tls_files(self) -> TlsFiles:
        base = self.config.tls_path
        ca, server, client = [await self.host.read_file(str(base / name))
                              for name in (CA_CERT, SERVER_CERT, CLIENT_CERT)]
        return TlsFiles(self.name, ca, server, client)

    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        return await probe.probe_host(self.host, self.config.qemu_binary, self.config.accel,
                                      cpus)

    # -- VMs

    def _paths(self, vm: str) -> Any:
        return process.vm_paths(self.config, vm)

    async def vm_exists(self, vm: str) -> bool:
        return await process.vm_pid(self.host, self._paths(vm)) is not None

    async def vm_state(self, vm: str) -> VmState:
        try:
            if not await self.vm_exists(vm):
                return VmState.STOPPED
            status = await self.monitor(vm).run_state(timeout=10)
        except HostKeyError:
            raise  # not an unknown state: the host must not be talked to at all
        except (HostError, QmpError):
            return VmState.UNKNOWN
        return process.run_state(status)

    async def start_vm(self, spec: VMSpec, *, incoming: bool = False,
                       held: bool = False) -> None:
        await self._drop_monitor(spec.name)
        await process.start_vm(self.host, self.config, spec,
                               incoming="defer" if incoming else None, paused=held)

    async def stop_vm(self, spec: VMSpec, *, force: bool = False,
                      timeout: float = 30.0) -> bool:
        # process.stop_vm talks to the monitor itself: ours must let go first
        await self._drop_monitor(spec.name)
        return await process.stop_vm(self.host, self.config, spec, force=force,
                                     timeout=timeout)

    async def remove_vm_dir(self, vm: str) -> None:
        await self._drop_monitor(vm)
        await process.remove_vm_dir(self.host, self.config, vm)

    def monitor(self, vm: str) -> QemuMonitor:
        if vm not in self._monitors:
            self._monitors[vm] = QemuMonitor(self.host, self._paths(vm).qmp, vm)
        return self._monitors[vm]

    async def _drop_monitor(self, vm: str) -> None:
        mon = self._monitors.get(vm)
        if mon is not None:
            await mon.close()

    async def console(self, vm: str, *, offset: int = 0, lines: int | None = None) -> str:
        return await process.read_console(self.host, self.config, vm, lines, offset=offset)

    async def console_size(self, vm: str) -> int:
        return await process.console_size(self.host, self.config, vm)

    # -- images

    async def image_info(self, path: str) -> ImageInfo:
        return await images.image_info(self.host, path)

    async def create_image(self, path: str, fmt: ImageFormat, size: int) -> None:
        await images.create_image(self.host, path, fmt, size)

    async def remove_image(self, path: str) -> None:
        await images.remove_image(self.host, path)

    async def free_bytes(self, directory: str) -> int:
        return await images.free_bytes(self.host, directory)

    async def read_head(self, path: str, length: int) -> bytes:
        return await self.host.read_head(path, length)

    async def close(self) -> None:
        for mon in self._monitors.values():
            await mon.close()
        self._monitors.clear()
        with contextlib.suppress(Exception):
            await self.host.close()
