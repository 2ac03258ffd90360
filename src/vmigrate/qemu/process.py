"""QEMU process lifecycle on a host: start daemonized, find, stop.

A VM's runtime files live in ``<data_dir>/vms/<name>/`` on its host: the
pidfile, the QMP and console sockets, the console log and QEMU's own log.
Processes are found and stopped by the PID in the pidfile, and only when
``/proc/<pid>/cmdline`` names that pidfile, so a reused PID is never killed.

Every command run on the host is an argv list (the bridge, tap and file names reach it
as words, never as shell text); the one shell script, :data:`_PID_SCRIPT`, is a
constant that takes the pidfile as a positional parameter.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from enum import StrEnum

from vmigrate.config import HostConfig
from vmigrate.errors import (
    CommandError,
    ConflictError,
    HostError,
    QmpError,
    SpecError,
    StateError,
    UserError,
    VmStartError,
)
from vmigrate.hosts import Host
from vmigrate.qemu.argv import VmPaths, build_argv
from vmigrate.qemu.qmp import qmp_session
from vmigrate.qemu.spec import VMSpec, tap_name

#: sun_path holds 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107


class VmState(StrEnum):
    """What the controller can say about a VM on its host."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    STOPPED = "stopped"  # no QEMU process
    UNKNOWN = "unknown"  # host unreachable or monitor not answering


def vm_paths(host: HostConfig, name: str) -> VmPaths:
    return VmPaths(f"{host.data_dir}/vms/{name}")


_PID_SCRIPT = """
pidfile=$1
[ -s "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
case "$pid" in ''|*[!0-9]*) exit 0;; esac
if [ -r /proc/$pid/cmdline ] && tr '\\0' '\\n' < /proc/$pid/cmdline | grep -qxF "$pidfile"; then
  echo "$pid"
fi
"""


async def vm_pid(host: Host, paths: VmPaths) -> int | None:
    """The PID of the VM's QEMU if it runs, else None."""
    res = await host.run(["sh", "-c", _PID_SCRIPT, "sh", paths.pidfile])
    out = res.stdout.strip()
    return int(out) if out else None


async def _check_bridges(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    """Raise :class:`SpecError` for a NIC whose bridge is not on the host. Only reads."""
    for bridge in dict.fromkeys(nic.bridge for nic in spec.nics):
        res = await host.run(["ip", "link", "show", "dev", bridge], check=False)
        if res.status != 0:
            raise SpecError(f"host {host_cfg.name} has no bridge {bridge!r} for the VM's NIC")


async def _setup_taps(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    """Create the VM's taps and plug them into their bridges (checked to exist by
    :func:`check_files`). After a failure, the taps made so far stay: the caller
    removes them (:func:`_remove_taps`)."""
    for i, nic in enumerate(spec.nics):
        tap = tap_name(spec.name, i)
        await host.run(["ip", "link", "del", "dev", tap], check=False)  # a stale one
        for argv in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                     ["ip", "link", "set", "dev", tap, "master", nic.bridge],
                     ["ip", "link", "set", "dev", tap, "up"]):
            res = await host.run(argv, check=False)
            if res.status != 0:
                raise CommandError(host.name, argv, res.status, res.stderr)


async def _remove_taps(host: Host, spec: VMSpec) -> None:
    for i in range(len(spec.nics)):
        await host.run(["ip", "link", "del", "dev", tap_name(spec.name, i)], check=False)


#: ``pc-i440fx-7.2   Standard PC ... (alias of ...)``: the first word of each line
_MACHINE_LINE = re.compile(r"^([a-z0-9][a-z0-9._-]*)\s")
#: ``name "e1000", bus PCI, alias "e1000-82540em", desc ...``
_DEVICE_LINE = re.compile(r'^name "([^"]+)"(?:, bus ([^,]+))?(?:, alias "([^"]+)")?')


def parse_machine_help(text: str) -> set[str]:
    """The machine types ``qemu -machine help`` lists (aliases such as ``pc`` included)."""
    return {m.group(1) for line in text.splitlines()[1:] if (m := _MACHINE_LINE.match(line))}


def parse_device_help(text: str) -> set[str]:
    """The device names (and their aliases) ``qemu -device help`` lists."""
    names: set[str] = set()
    for line in text.splitlines():
        m = _DEVICE_LINE.match(line.strip())
        if m:
            names.add(m.group(1))
            if m.group(3):
                names.add(m.group(3))
    return names


async def check_host(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    """Check on the host, before anything is created there, what only it can tell:
    that its QEMU (``qemu_binary``) knows the spec's machine type (``-machine help``)
    and NIC models (``-device help``). Raises :class:`SpecError` naming what is missing.
    A binary that cannot list them is not judged here: starting it reports the error."""
    binary = host_cfg.qemu_binary
    res = await host.run([binary, "-machine", "help"], check=False, timeout=60)
    machines = parse_machine_help(res.stdout) if res.status == 0 else set()
    if machines and spec.machine not in machines:
        raise SpecError(f"machine type {spec.machine!r} is unknown to {binary} on host "
                        f"{host_cfg.name} (see '{binary} -machine help')")
    models = sorted({nic.model for nic in spec.nics})
    if not models:
        return
    res = await host.run([binary, "-device", "help"], check=False, timeout=60)
    devices = parse_device_help(res.stdout) if res.status == 0 else set()
    unknown = [m for m in models if m not in devices]
    if devices and unknown:
        raise SpecError(f"NIC model {', '.join(unknown)} is unknown to {binary} on host "
                        f"{host_cfg.name} (see '{binary} -device help')")


async def check_files(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    """Check what the host must provide before anything is created there: raise
    :class:`SpecError` naming every disk or kernel file missing on it, a machine type or
    NIC model its QEMU does not know (:func:`check_host`), or a bridge it lacks."""
    needed = [d.path for d in spec.disks]
    if spec.kernel is not None:
        needed += [spec.kernel.kernel] + ([spec.kernel.initrd] if spec.kernel.initrd else [])
    missing = await host.missing(needed)
    if missing:
        raise SpecError(f"not found on host {host_cfg.name}: {', '.join(missing)}")
    await check_host(host, host_cfg, spec)
    await _check_bridges(host, host_cfg, spec)


async def start_vm(
    host: Host, host_cfg: HostConfig, spec: VMSpec, *, incoming: str | None = None,
    paused: bool = False,
) -> int:
    """Start ``spec`` daemonized on ``host``; return QEMU's PID.

    With ``incoming`` (e.g. ``"defer"``) QEMU waits for an incoming migration
    instead of booting.

    Before anything is created, the disks and kernel files are checked to exist
    (:class:`SpecError` otherwise). If QEMU fails to start, its taps and sockets
    are removed and :class:`VmStartError` carries QEMU's own message.
    """
    paths = vm_paths(host_cfg, spec.name)
    if len(paths.console_sock.encode()) > MAX_SOCKET_PATH:
        raise SpecError(
            f"socket path {paths.console_sock} is longer than {MAX_SOCKET_PATH} bytes, the "
            "limit of a unix socket: use a shorter VM name or data_dir"
        )
    await check_files(host, host_cfg, spec)
    if await vm_pid(host, paths) is not None:
        raise ConflictError(f"VM {spec.name} is already running on {host_cfg.name}")
    await host.run(["mkdir", "-p", "--", paths.dir])
    await host.run(["rm", "-f", "--", paths.qmp, paths.console_sock, paths.pidfile,
                    paths.qemu_log])
    await host.write_file(f"{paths.dir}/spec.json", spec.model_dump_json(indent=2).encode())
    argv = build_argv(spec, paths, binary=host_cfg.qemu_binary, accel=host_cfg.accel,
                      incoming=incoming, paused=paused)
    try:
        await _setup_taps(host, host_cfg, spec)
        res = await host.run(argv, check=False, timeout=120)
        if res.status != 0:
            log = await host.run(["cat", "--", paths.qemu_log], check=False)
            detail = (res.stderr.strip() or log.stdout.strip() or f"exit {res.status}")
            raise VmStartError(
                f"QEMU failed to start {spec.name} on {host_cfg.name}: {detail.splitlines()[-1]}"
            )
        pid = await vm_pid(host, paths)
        if pid is None:
            raise VmStartError(f"QEMU for {spec.name} on {host_cfg.name} exited right after start")
    except BaseException:
        await _remove_taps(host, spec)
        raise
    return pid


async def vm_state(host: Host, host_cfg: HostConfig, name: str) -> VmState:
    """Ask the host and the VM's monitor what state the VM is in."""
    paths = vm_paths(host_cfg, name)
    try:
        if await vm_pid(host, paths) is None:
            return VmState.STOPPED
        async with qmp_session(host, paths.qmp, vm=name) as qmp:
            status = await qmp.query_status()
    except (HostError, QmpError):
        return VmState.UNKNOWN
    return run_state(status)


def run_state(status: str) -> VmState:
    """The :class:`VmState` of QEMU's ``query-status`` answer: held, suspended or
    stopped on an I/O error is paused; what else QEMU may say is unknown."""
    try:
        return VmState(status)
    except ValueError:
        return VmState.PAUSED if status in {"prelaunch", "suspended", "io-error"} else (
            VmState.UNKNOWN)


async def _wait_gone(host: Host, paths: VmPaths, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if await vm_pid(host, paths) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.3)


async def stop_vm(
    host: Host, host_cfg: HostConfig, spec: VMSpec, *, force: bool = False, timeout: float = 30.0
) -> bool:
    """Stop the VM. Returns False when it was not running.

    Without ``force``: ACPI power-down, then wait up to ``timeout``; a guest
    that does not shut down raises :class:`StateError` and keeps running.
    With ``force``: QMP ``quit``, then SIGTERM, then SIGKILL of the PID.
    Taps are removed once the process is gone. A ``timeout`` that is not a positive
    number raises :class:`UserError` before anything is done.
    """
    if not math.isfinite(timeout) or timeout <= 0:
        raise UserError(f"timeout {timeout:g}: must be a positive number of seconds")
    paths = vm_paths(host_cfg, spec.name)
    pid = await vm_pid(host, paths)
    if pid is None:
        await _remove_taps(host, spec)
        return False
    if not force:
        async with qmp_session(host, paths.qmp, vm=spec.name) as qmp:
            await qmp.execute("system_powerdown")
        if not await _wait_gone(host, paths, timeout):
            raise StateError(
                f"VM {spec.name} did not shut down within {timeout:.0f}s after ACPI power-down; "
                "it is still running (use --force to stop it hard)"
            )
    else:
        try:
            async with qmp_session(host, paths.qmp, vm=spec.name, timeout=5) as qmp:
                await qmp.execute("quit")
        except QmpError:
            pass
        if not await _wait_gone(host, paths, 10):
            for sig, wait in (("TERM", 5.0), ("KILL", 5.0)):
                # kill only if the PID still is our QEMU
                if await vm_pid(host, paths) == pid:
                    await host.run(["kill", f"-{sig}", str(pid)], check=False)
                if await _wait_gone(host, paths, wait):
                    break
            else:
                raise HostError(f"QEMU PID {pid} for {spec.name} on {host_cfg.name} did not exit")
    await _remove_taps(host, spec)
    await host.run(["rm", "-f", "--", paths.pidfile], check=False)
    return True


async def remove_vm_dir(host: Host, host_cfg: HostConfig, name: str) -> None:
    """Delete the VM's runtime directory (never its disks)."""
    await host.run(["rm", "-rf", "--", vm_paths(host_cfg, name).dir])


async def read_console(host: Host, host_cfg: HostConfig, name: str, lines: int | None = None,
                       *, offset: int = 0) -> str:
    """The VM's serial console log: from byte ``offset`` on, or only its last
    ``lines`` lines if given (:class:`UserError` when either is negative)."""
    if (lines is not None and lines < 0) or offset < 0:
        raise UserError("a line count or offset cannot be negative")
    log = vm_paths(host_cfg, name).console_log
    if lines is not None:
        argv = ["tail", "-n", str(max(0, int(lines))), "--", log]
    elif offset > 0:
        argv = ["tail", "-c", f"+{int(offset) + 1}", "--", log]
    else:
        argv = ["cat", "--", log]
    res = await host.run(argv, check=False)
    return res.stdout if res.status == 0 else ""


async def console_size(host: Host, host_cfg: HostConfig, name: str) -> int:
    """The console log's size in bytes (0 when there is none yet)."""
    res = await host.run(["stat", "-c", "%s", "--", vm_paths(host_cfg, name).console_log],
                         check=False)
    text = res.stdout.strip()
    return int(text) if res.status == 0 and text.isdigit() else 0


def spec_json(spec: VMSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2)
