"""The fake driver: one fake host, as the engine sees it.

Every call first records itself and lets a tick pass, then the injected faults
are checked (a fault that hits changes nothing, unless it strikes ``after``),
then an unreachable host raises :class:`~vmigrate.errors.HostUnreachableError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vmigrate.config import HostConfig
from vmigrate.drivers.base import Driver, ImageFormat, ImageInfo, VmState
from vmigrate.errors import (
    CommandError,
    ConflictError,
    HostUnreachableError,
    NotFoundError,
    SpecError,
    StateError,
    VmStartError,
)
from vmigrate.pki import CA_CERT, CLIENT_CERT, QEMU_FILES, SERVER_CERT, TlsFiles
from vmigrate.qemu.cpu import QemuOffer
from vmigrate.qemu.spec import CpuSpec, VMSpec
from vmigrate.testing.fakehv import _pki
from vmigrate.testing.fakehv._faults import ControllerCrash, Fault
from vmigrate.testing.fakehv._model import FakeHost, FakeImage
from vmigrate.testing.fakehv._monitor import FakeMonitor

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._cluster import FakeCluster

__all__ = ["FakeDriver", "vm_state_of"]

#: sun_path holds 108 bytes including the terminating NUL
_MAX_SOCKET_PATH = 107


def vm_state_of(run_state: str) -> VmState:
    """What the driver says of a process in QEMU run state ``run_state``."""
    try:
        return VmState(run_state)
    except ValueError:
        if run_state in ("prelaunch", "suspended", "io-error", "finish-migrate"):
            return VmState.PAUSED
        return VmState.UNKNOWN


class FakeDriver(Driver):
    """A fake host's driver (get it from :meth:`FakeCluster.driver`)."""

    def __init__(self, cluster: FakeCluster, config: HostConfig) -> None:
        super().__init__(config)
        self.cluster = cluster
        self._monitors: dict[str, FakeMonitor] = {}

    def __repr__(self) -> str:
        return f"FakeDriver({self.name!r})"

    @property
    def _host(self) -> FakeHost:
        return self.cluster.hosts[self.name]

    def _fault_error(self, fault: Fault, method: str) -> BaseException:
        if fault.kind == "crash":
            self.cluster.restart_controller()
            return ControllerCrash(f"controller crashed at {self.name}: {method}")
        if fault.kind == "command":
            return CommandError(self.name, [method], 1, "injected fault")
        if fault.kind == "timeout":  # as Host.run reports a command that ran too long
            return CommandError(self.name, [method], 124, f"{method}: timed out (injected)")
        return HostUnreachableError(f"host {self.name}: connection lost during {method} "
                                    f"(injected {fault.kind})")

    @contextmanager
    def _op(self, method: str, vm: str | None = None) -> Iterator[FakeHost]:
        hit = self.cluster._enter(self.name, vm, method, "driver")
        if hit.before is not None:
            raise self._fault_error(hit.before, method)
        host = self._host
        if not host.reachable:
            raise HostUnreachableError(f"host {self.name} does not answer")
        try:
            yield host
        finally:
            self.cluster._check_split_brain()
        for fault in hit.after:
            if fault.kind == "cancel":
                if fault.on_cancel is not None:
                    fault.on_cancel()
            else:
                raise self._fault_error(fault, method)

    # -- the host -----------------------------------------------------------------------

    async def check_reachable(self) -> None:
        await asyncio.sleep(0)
        with self._op("check_reachable"):
            pass

    async def can_reach(self, address: str) -> bool:
        """True for an address of a host whose link from here is up (or of this host)."""
        await asyncio.sleep(0)
        with self._op("can_reach"):
            target = self.cluster._host_by_address(address, self.name)
            return target is not None and self.cluster.link_is_up(self.name, target.name)

    async def cut_connections(self, address: str, port: int) -> None:
        """Mirrors writing to ``address:port`` fail (an aborting one concludes); a
        migration stream to it breaks (pre-copy fails, post-copy pauses)."""
        await asyncio.sleep(0)
        with self._op("cut_connections") as host:
            self.cluster._cut(host, address, port)

    async def missing(self, paths: Sequence[str]) -> list[str]:
        await asyncio.sleep(0)
        with self._op("missing") as host:
            return [p for p in paths if p not in host.files]

    async def tls_files(self) -> TlsFiles:
        """The certificates in the host's tls_path; a missing one is a CommandError (as
        ``cat`` on a real host)."""
        await asyncio.sleep(0)
        with self._op("tls_files") as host:
            base = str(self.config.tls_path)
            out: list[bytes] = []
            for name in (CA_CERT, SERVER_CERT, CLIENT_CERT):
                try:
                    out.append(_pki.read(dict(host.files), f"{base}/{name}"))
                except NotFoundError:
                    raise CommandError(self.name, ["cat", f"{base}/{name}"], 1,
                                       f"cat: {base}/{name}: No such file or directory"
                                       ) from None
            return TlsFiles(self.name, *out)

    async def tls_missing(self) -> list[str]:
        await asyncio.sleep(0)
        with self._op("tls_missing") as host:
            base = str(self.config.tls_path)
            return [f"{base}/{n}" for n in QEMU_FILES if f"{base}/{n}" not in host.files]

    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        """The host's QEMU (``FakeHost.qemu``), as its probe would answer."""
        await asyncio.sleep(0)
        with self._op("qemu_offer") as host:
            return host.qemu.offer(cpus)

    # -- VMs ---------------------------------------------------------------------------

    async def vm_state(self, vm: str) -> VmState:
        """Never raises for the host or the monitor: ``UNKNOWN`` then (an injected
        command, connection or unreachable fault too)."""
        await asyncio.sleep(0)
        hit = self.cluster._enter(self.name, vm, "vm_state", "driver")
        if hit.before is not None:
            if hit.before.kind == "crash":
                raise self._fault_error(hit.before, "vm_state")
            return VmState.UNKNOWN
        host = self._host
        if not host.reachable:
            return VmState.UNKNOWN
        proc = host.vms.get(vm)
        state = VmState.STOPPED if proc is None else vm_state_of(proc.run_state)
        for fault in hit.after:
            if fault.kind == "cancel":
                if fault.on_cancel is not None:
                    fault.on_cancel()
            elif fault.kind == "crash":
                raise self._fault_error(fault, "vm_state")
            else:
                return VmState.UNKNOWN
        return state

    async def vm_exists(self, vm: str) -> bool:
        await asyncio.sleep(0)
        with self._op("vm_exists", vm) as host:
            return vm in host.vms

    async def start_vm(self, spec: VMSpec, *, incoming: bool = False,
                       held: bool = False) -> None:
        """Refused, with nothing started, for a VM already there (:class:`ConflictError`),
        missing disk or kernel files (:class:`SpecError`), a qcow2 disk that is not
        qcow2 or a writable disk another process holds (:class:`VmStartError`)."""
        await asyncio.sleep(0)
        with self._op("start_vm", spec.name) as host:
            sock = f"{self.runtime_dir(spec.name)}/console.sock"
            if len(sock.encode()) > _MAX_SOCKET_PATH:
                raise SpecError(f"socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes")
            needed = [d.path for d in spec.disks]
            if spec.kernel is not None:
                needed.append(spec.kernel.kernel)
                if spec.kernel.initrd:
                    needed.append(spec.kernel.initrd)
            missing = [p for p in needed if p not in host.files]
            if missing:
                raise SpecError(f"not found on host {self.name}: {', '.join(missing)}")
            if spec.name in host.vms:
                raise ConflictError(f"VM {spec.name} is already running on {self.name}")
            for disk in spec.disks:
                if disk.format == "qcow2" and host.files[disk.path].format != "qcow2":
                    raise VmStartError(f"QEMU failed to start {spec.name} on {self.name}: "
                                       f"Image is not in qcow2 format ({disk.path})")
            if not incoming:
                problem = self.cluster._lock_conflict(host, spec)
                if problem is not None:
                    raise VmStartError(f"QEMU failed to start {spec.name} on {self.name}: "
                                       f"{problem}")
            problem = self.cluster._start_problem(host, spec)
            if problem is not None:  # a machine type or CPU model this QEMU lacks
                raise VmStartError(f"QEMU failed to start {spec.name} on {self.name}: "
                                   f"{problem}")
            self.cluster._spawn(host, spec, incoming=incoming, held=held)

    async def stop_vm(self, spec: VMSpec, *, force: bool = False,
                      timeout: float = 30.0) -> bool:
        """``force``: the process ends. Otherwise the power button: an ACPI guest that
        runs powers off (its process ends); any other (no ACPI, paused, incoming, or a
        shutdown action of ``pause`` that keeps QEMU in ``shutdown``) raises
        :class:`StateError` and its process stays -- the button stays pressed for a
        paused guest, which powers off when it is resumed, as a real one does."""
        await asyncio.sleep(0)
        with self._op("stop_vm", spec.name) as host:
            vm = host.vms.get(spec.name)
            if vm is None:
                return False
            if force:
                self.cluster._exit(vm, "host-qmp-quit")
                return True
            self.cluster._emit(vm, "POWERDOWN")
            if vm.powerdown_at is None:
                vm.powerdown_at = self.cluster.tick + self.cluster.acpi_ticks
            if self.cluster.guest(vm.name).acpi and vm.run_state == "running":
                self.cluster.advance(self.cluster.acpi_ticks)
            if vm.alive:
                raise StateError(
                    f"VM {spec.name} did not shut down within {timeout:.0f}s after ACPI "
                    f"power-down; its QEMU is still there ({vm.run_state})")
            return True

    async def remove_vm_dir(self, vm: str) -> None:
        """Deletes the runtime files, console log included. A process still running is
        not stopped: the driver cannot find it any more (it becomes an orphan)."""
        await asyncio.sleep(0)
        with self._op("remove_vm_dir", vm) as host:
            proc = host.vms.get(vm)
            if proc is not None:
                self.cluster._orphan(proc)
            host.consoles.pop(vm, None)

    def monitor(self, vm: str) -> FakeMonitor:
        """Not a recorded call (it only builds the object)."""
        if vm not in self._monitors:
            self._monitors[vm] = FakeMonitor(self.cluster, self, vm)
        return self._monitors[vm]

    async def console(self, vm: str, *, offset: int = 0, lines: int | None = None) -> str:
        await asyncio.sleep(0)
        with self._op("console", vm) as host:
            text = host.consoles.get(vm, "")
            if lines is not None:
                return "".join(text.splitlines(keepends=True)[-lines:]) if lines > 0 else ""
            return text.encode()[max(0, offset):].decode(errors="replace")

    async def console_size(self, vm: str) -> int:
        await asyncio.sleep(0)
        with self._op("console_size", vm) as host:
            return len(host.consoles.get(vm, "").encode())

    # -- images -----------------------------------------------------------------------

    async def image_info(self, path: str) -> ImageInfo:
        await asyncio.sleep(0)
        with self._op("image_info") as host:
            image = host.files.get(path)
            if image is None:
                raise SpecError(f"on host {self.name}: no image at {path}")
            return ImageInfo(path, image.format, image.size, image.allocated)

    async def create_image(self, path: str, fmt: ImageFormat, size: int) -> None:
        await asyncio.sleep(0)
        with self._op("create_image") as host:
            if path in host.files:
                raise ConflictError(f"{path} already exists on {self.name}")
            if fmt not in ("raw", "qcow2") or size <= 0:
                raise SpecError(f"cannot create a {fmt} image of {size} bytes")
            self.cluster._put_file(self.name, path, FakeImage(
                path, fmt, size, block_size=self.cluster.block_size))

    async def remove_image(self, path: str) -> None:
        """Unlinks the file; a process that has it open keeps writing to what is now
        a deleted file (as on Linux)."""
        await asyncio.sleep(0)
        with self._op("remove_image"):
            self.cluster._drop_file(self.name, path)

    async def free_bytes(self, directory: str) -> int:
        await asyncio.sleep(0)
        with self._op("free_bytes") as host:
            used = sum(f.allocated for f in {id(f): f for f in host.files.values()}.values())
            return max(0, host.capacity - used)

    async def read_head(self, path: str, length: int) -> bytes:
        await asyncio.sleep(0)
        with self._op("read_head") as host:
            image = host.files.get(path)
            if image is None:
                raise CommandError(self.name, ["head", "-c", str(length), path], 1,
                                   f"head: cannot open '{path}' for reading: No such file")
            return image.read(0, length)

    async def close(self) -> None:
        for monitor in self._monitors.values():
            await monitor.close()
