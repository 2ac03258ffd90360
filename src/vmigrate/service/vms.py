"""Define, start, stop, inspect and remove VMs on inventory hosts."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import ConflictError, GuestTimeoutError, HostError, SpecError
from vmigrate.hosts import Host, HostPool
from vmigrate.lab.image import image_paths
from vmigrate.lab.workloads import format_workloads, kernel_cmdline, parse_workloads
from vmigrate.qemu import process
from vmigrate.qemu.cpu import (
    DEFAULT_CPU,
    HOST_MODELS,
    cpu_requests,
    parse_cpu,
    pin_cpu,
    pin_machine,
    unavailable,
)
from vmigrate.qemu.probe import probe_host
from vmigrate.qemu.process import VmState
from vmigrate.qemu.qmp import qmp_session
from vmigrate.qemu.spec import (
    DiskSpec,
    KernelBoot,
    NicSpec,
    VMSpec,
    build_spec,
    mac_for,
    parse_disk,
    parse_memory,
    parse_nic,
)
from vmigrate.service.hostlock import HostLocks, VmLocks, controller_id, job_lock_error
from vmigrate.store import Store, VmRecord

FIRST_GUEST_HOST = 100


@dataclass
class CreateRequest:
    """What ``vmigrate vm create`` was asked for, before validation."""

    name: str
    host: str
    memory: str = "256M"
    vcpus: int = 1
    disks: list[str] = field(default_factory=list)
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    workload: str | None = None
    ip: str | None = None
    nic: bool = True
    nics: list[str] = field(default_factory=list)
    machine: str = "pc"
    #: ``MODEL[,+FEATURE|-FEATURE ...]``; None: the host's ``vm_cpu``, the inventory's
    #: ``[defaults] cpu``, else x86-64-v2-AES
    cpu: str | None = None
    start: bool = True


@dataclass(frozen=True)
class VmInfo:
    """A VM as ``vm show`` / ``vm list`` report it."""

    name: str
    host: str
    state: VmState
    pid: int | None
    spec: VMSpec

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "state": self.state.value,
            "pid": self.pid,
            "ip": self.spec.ip,
            "workload": self.spec.workload,
            "spec": self.spec.model_dump(mode="json"),
        }


def _abspath(path: str) -> str:
    return path if os.path.isabs(path) else os.path.abspath(path)


class VmService:
    """VM operations over the inventory's hosts. Use as ``async with``: host sessions
    are opened on demand and closed on exit."""

    def __init__(self, inventory: Inventory, store: Store, *,
                 locks: VmLocks | None = None) -> None:
        """``locks``: the VM locks on the hosts (default: the lock files of the
        controller whose id is kept next to ``store``)."""
        self.inventory = inventory
        self.store = store
        self._hosts = HostPool(inventory)
        self._locks = locks

    async def __aenter__(self) -> VmService:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._hosts.aclose()

    def _host(self, name: str) -> tuple[Host, HostConfig]:
        return self._hosts.get(name)

    def spec(self, record: VmRecord) -> VMSpec:
        return VMSpec.model_validate_json(record.spec_json)

    async def _unlocked(self, vm: str, host: str) -> None:
        """Before a command changes the VM's state: :class:`ConflictError` naming the
        job when a job of ours locks ``vm`` (running, or waiting for an operator), or
        when a job of any controller holds its lock on ``host``
        (:class:`~vmigrate.service.hostlock.VmLockedError`). Changes nothing but a
        stale lock file of ours."""
        job = self.store.locking_job(vm)
        if job is not None:
            raise job_lock_error(vm, job)
        if self._locks is None:
            self._locks = HostLocks(self.store, controller_id(self.store.path.parent),
                                    self._hosts)
        await self._locks.check(vm, [host])

    # -- create ------------------------------------------------------------------------

    def build(self, req: CreateRequest) -> VMSpec:
        """Validate a create request into a spec. Pure but for reading the image dir."""
        host_cfg = self.inventory.host(req.host)
        memory = parse_memory(req.memory)
        disks: list[DiskSpec] = []
        for text in req.disks:
            disk = parse_disk(text)
            disks.append(disk.model_copy(update={"path": _abspath(disk.path)}))
        workloads = parse_workloads(req.workload) if req.workload else None
        nics: list[NicSpec] = [parse_nic(text, req.name, i) for i, text in enumerate(req.nics)]
        if req.nic and not nics and host_cfg.vm_bridge:
            nics.append(NicSpec(bridge=host_cfg.vm_bridge, mac=mac_for(req.name)))
        kernel: KernelBoot | None = None
        ip: str | None = None
        if workloads is not None or (req.kernel is None and not disks):
            if req.kernel is None:
                img = image_paths()
                req_kernel, req_initrd = str(img.kernel), str(img.initrd)
            else:
                req_kernel, req_initrd = req.kernel, req.initrd or ""
            cidr = self._guest_address(req, bool(nics))
            ip = cidr.split("/")[0] if cidr else None
            gateway = self.inventory.lab.gateway if self.inventory.lab else None
            append = kernel_cmdline(ip=cidr, gateway=gateway, workload=workloads,
                                    extra=req.append)
            kernel = KernelBoot(kernel=_abspath(req_kernel),
                                initrd=_abspath(req_initrd) if req_initrd else None,
                                append=append)
        elif req.kernel is not None:
            kernel = KernelBoot(kernel=_abspath(req.kernel),
                                initrd=_abspath(req.initrd) if req.initrd else None,
                                append=req.append)
        elif req.initrd or req.append:
            raise SpecError("--initrd and --append need --kernel")
        return build_spec(
            name=req.name,
            vcpus=req.vcpus,
            memory_mib=memory,
            machine=req.machine,
            cpu=parse_cpu(req.cpu or host_cfg.vm_cpu or self.inventory.defaults.cpu
                          or DEFAULT_CPU),
            disks=tuple(disks),
            nics=tuple(nics),
            kernel=kernel,
            workload=format_workloads(workloads) if workloads else None,
            ip=ip,
        )

    def _guest_address(self, req: CreateRequest, has_nic: bool) -> str | None:
        lab = self.inventory.lab
        if req.ip is not None:
            try:
                iface = ipaddress.ip_interface(req.ip if "/" in req.ip else
                                               f"{req.ip}/{self._prefix()}")
            except ValueError as exc:
                raise SpecError(f"invalid --ip {req.ip!r}: {exc}") from exc
            return str(iface)
        if lab is None or not has_nic:
            return None
        net = ipaddress.ip_network(lab.vm_network)
        used = {self.spec(r).ip for r in self.store.list_vms()}
        reserved = {lab.gateway}
        for offset in range(FIRST_GUEST_HOST, net.num_addresses - 2):
            addr = str(net.network_address + offset)
            if addr not in used and addr not in reserved:
                return f"{addr}/{net.prefixlen}"
        raise ConflictError(f"no free guest address left in {lab.vm_network}")

    def _prefix(self) -> int:
        lab = self.inventory.lab
        return ipaddress.ip_network(lab.vm_network).prefixlen if lab else 24

    async def create(self, req: CreateRequest) -> VmInfo:
        """Define the VM and (unless ``req.start`` is False) start it.

        Every check runs before anything is stored or started; if QEMU then
        fails to start, the definition is removed again and the error raised.
        """
        spec = self.build(req)
        host, host_cfg = self._host(req.host)
        await process.check_files(host, host_cfg, spec)
        if req.start:
            await self._unlocked(spec.name, req.host)
        spec = await pin_hardware(spec, host, host_cfg)
        self.store.add_vm(spec.name, req.host, spec.model_dump_json())
        if not req.start:
            return VmInfo(spec.name, req.host, VmState.STOPPED, None, spec)
        try:
            pid = await process.start_vm(host, host_cfg, spec)
        except BaseException:
            self.store.remove_vm(spec.name)
            raise
        return VmInfo(spec.name, req.host, VmState.RUNNING, pid, spec)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, name: str) -> VmInfo:
        """Start a defined VM; refused while a job locks it (see :meth:`_unlocked`)."""
        record = self.store.get_vm(name)
        await self._unlocked(name, record.host)
        host, host_cfg = self._host(record.host)
        spec = self.spec(record)
        pid = await process.start_vm(host, host_cfg, spec)
        return VmInfo(name, record.host, VmState.RUNNING, pid, spec)

    async def stop(self, name: str, *, force: bool = False, timeout: float = 30.0) -> bool:
        """Stop the VM; refused while a job locks it (see :meth:`_unlocked`)."""
        record = self.store.get_vm(name)
        await self._unlocked(name, record.host)
        host, host_cfg = self._host(record.host)
        return await process.stop_vm(host, host_cfg, self.spec(record), force=force,
                                     timeout=timeout)

    async def destroy(self, name: str) -> None:
        """Stop the VM hard if it runs and forget it. Its disk images are kept. Refused
        while a job locks it (see :meth:`_unlocked`): nothing is stopped."""
        record = self.store.get_vm(name)
        await self._unlocked(name, record.host)
        host, host_cfg = self._host(record.host)
        await process.stop_vm(host, host_cfg, self.spec(record), force=True)
        await process.remove_vm_dir(host, host_cfg, name)
        self.store.remove_vm(name)

    async def show(self, name: str) -> VmInfo:
        record = self.store.get_vm(name)
        return await self._info(record)

    async def _info(self, record: VmRecord) -> VmInfo:
        spec = self.spec(record)
        try:
            host, host_cfg = self._host(record.host)
            paths = process.vm_paths(host_cfg, record.name)
            pid = await process.vm_pid(host, paths)
            state = await process.vm_state(host, host_cfg, record.name) if pid else (
                VmState.STOPPED)
        except HostError:  # an unreachable host must not hide the others
            pid, state = None, VmState.UNKNOWN
        return VmInfo(record.name, record.host, state, pid, spec)

    async def list(self) -> list[VmInfo]:
        return [await self._info(r) for r in self.store.list_vms()]

    async def console(self, name: str, lines: int | None = None) -> str:
        record = self.store.get_vm(name)
        host, host_cfg = self._host(record.host)
        return await process.read_console(host, host_cfg, name, lines)

    async def qmp(self, name: str, message: dict[str, Any]) -> dict[str, Any]:
        """Send one raw QMP command; return QEMU's whole reply. Refused while a job
        locks the VM (see :meth:`_unlocked`): a job's QMP session must be the only
        one that changes the VM, and vmigrate cannot tell which commands only
        read."""
        record = self.store.get_vm(name)
        await self._unlocked(name, record.host)
        host, host_cfg = self._host(record.host)
        paths = process.vm_paths(host_cfg, name)
        if await process.vm_pid(host, paths) is None:
            raise ConflictError(f"VM {name} is not running")
        async with qmp_session(host, paths.qmp, vm=name) as session:
            return await session.execute_raw(message)


async def pin_hardware(spec: VMSpec, host: Host, host_cfg: HostConfig) -> VMSpec:
    """``spec`` with its hardware as the host's QEMU resolves it, as it is stored: the
    machine type versioned (``pc`` -> ``pc-i440fx-7.2``) and the CPU model too
    (``qemu64`` -> ``qemu64-v1``), so a QEMU upgrade never changes a defined VM's
    hardware (:mod:`vmigrate.qemu.cpu`). Asks a probe of the host's QEMU; changes
    nothing. Raises :class:`SpecError` for a machine type or CPU model the host's QEMU
    does not know, CPU features the host cannot give in full (its QEMU, its CPU, its
    ``cpu_limit``), and ``host``/``max`` on a host not declared identical to others
    (``cpu_group``); :class:`~vmigrate.errors.CommandError` when the probe fails."""
    cpu = spec.cpu
    assert cpu is not None  # VmService.build always gives one
    if cpu.model in HOST_MODELS and host_cfg.cpu_group is None:
        raise SpecError(f"CPU model {cpu.model} passes host {host_cfg.name}'s CPU through, "
                        "so the VM could only move to identical hosts: declare them with the "
                        "same cpu_group in the inventory, or choose a model (--cpu "
                        f"{DEFAULT_CPU})")
    limit = parse_cpu(host_cfg.cpu_limit) if host_cfg.cpu_limit else None
    offer = await probe_host(host, host_cfg.qemu_binary, host_cfg.accel,
                             cpu_requests(cpu, limit))
    machine = pin_machine(spec.machine, offer, host_cfg.name)
    missing = unavailable(cpu, offer, limit=limit)
    if missing:
        raise SpecError(f"host {host_cfg.name} cannot give CPU model {cpu.describe()} these "
                        f"features: {', '.join(missing)} (choose an older model with --cpu, "
                        "or another host)")
    return spec.model_copy(update={"machine": machine,
                                   "cpu": pin_cpu(cpu, offer, host_cfg.name)})


class ConsoleFollower:
    """Reads a VM's console log incrementally: each line is seen once, whole."""

    def __init__(self, svc: VmService, name: str) -> None:
        self.svc = svc
        self.name = name
        self._seen = 0
        self._pending: list[str] = []

    async def _read(self) -> None:
        text = await self.svc.console(self.name)
        if len(text) < self._seen:  # the log was truncated (VM restarted)
            self._seen = 0
        end = text.rfind("\n") + 1
        if end > self._seen:
            complete = text[self._seen : end]
            self._seen = end
            self._pending += [line.rstrip("\r") for line in complete.splitlines()]

    async def wait(
        self, pattern: str, *, timeout: float = 120.0, interval: float = 1.0,
        on_line: Callable[[str], None] | None = None,
    ) -> re.Match[str]:
        """Wait for a new line matching ``pattern``; ``on_line`` sees every new line.
        Raises :class:`GuestTimeoutError` after ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            await self._read()
            while self._pending:
                line = self._pending.pop(0)
                if on_line is not None and line.strip():
                    on_line(line)
                match = regex.search(line)
                if match:
                    return match
            if time.monotonic() >= deadline:
                raise GuestTimeoutError(f"VM {self.name}: no console line matching {pattern!r} "
                                   f"within {timeout:.0f}s")
            await asyncio.sleep(interval)
