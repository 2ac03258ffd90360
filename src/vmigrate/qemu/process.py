"""QEMU process lifecycle on a host: start daemonized, find, stop.

A VM's runtime files live in ``<data_dir>/vms/<name>/`` on its host: the
pidfile, the QMP and console sockets, the console log and QEMU's own log.
Processes are found and stopped by the PID in the pidfile, and only when
``/proc/<pid>/cmdline`` names that pidfile, so a reused PID is never killed.
"""

from __future__ import annotations

import asyncio
import json
import shlex
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


async def _setup_taps(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    for i, nic in enumerate(spec.nics):
        tap = tap_name(spec.name, i)
        script = (
            f"ip link show {shlex.quote(nic.bridge)} >/dev/null 2>&1 || "
            f"{{ echo 'no bridge {nic.bridge} on this host' >&2; exit 3; }}; "
            f"ip link del {tap} 2>/dev/null; "
            f"ip tuntap add dev {tap} mode tap && "
            f"ip link set {tap} master {shlex.quote(nic.bridge)} && ip link set {tap} up"
        )
        res = await host.sh(script, check=False)
        if res.status == 3:
            raise SpecError(f"host {host_cfg.name} has no bridge {nic.bridge!r} for the VM's NIC")
        if res.status != 0:
            raise CommandError(host.name, ["ip", "tuntap", tap], res.status, res.stderr)


async def _remove_taps(host: Host, spec: VMSpec) -> None:
    for i in range(len(spec.nics)):
        await host.sh(f"ip link del {tap_name(spec.name, i)} 2>/dev/null || true", check=False)


async def check_files(host: Host, host_cfg: HostConfig, spec: VMSpec) -> None:
    """Raise :class:`SpecError` naming every disk or kernel file missing on the host."""
    needed = [d.path for d in spec.disks]
    if spec.kernel is not None:
        needed += [spec.kernel.kernel] + ([spec.kernel.initrd] if spec.kernel.initrd else [])
    missing = await host.missing(needed)
    if missing:
        raise SpecError(f"not found on host {host_cfg.name}: {', '.join(missing)}")


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
    q = shlex.quote(paths.dir)
    await host.sh(f"mkdir -p {q} && rm -f {q}/qmp.sock {q}/console.sock {q}/qemu.pid {q}/qemu.log")
    await host.write_file(f"{paths.dir}/spec.json", spec.model_dump_json(indent=2).encode())
    argv = build_argv(spec, paths, binary=host_cfg.qemu_binary, accel=host_cfg.accel,
                      incoming=incoming, paused=paused)
    try:
        await _setup_taps(host, host_cfg, spec)
        res = await host.run(argv, check=False, timeout=120)
        if res.status != 0:
            log = await host.sh(f"cat {shlex.quote(paths.qemu_log)} 2>/dev/null", check=False)
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
    Taps are removed once the process is gone.
    """
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
    await host.sh(f"rm -f {shlex.quote(paths.pidfile)}", check=False)
    return True


async def remove_vm_dir(host: Host, host_cfg: HostConfig, name: str) -> None:
    """Delete the VM's runtime directory (never its disks)."""
    await host.run(["rm", "-rf", "--", vm_paths(host_cfg, name).dir])


async def read_console(host: Host, host_cfg: HostConfig, name: str, lines: int | None = None,
                       *, offset: int = 0) -> str:
    """The VM's serial console log: from byte ``offset`` on, or only its last
    ``lines`` lines if given."""
    log = shlex.quote(vm_paths(host_cfg, name).console_log)
    if lines is not None:
        cmd = f"tail -n {int(lines)} {log}"
    elif offset > 0:
        cmd = f"tail -c +{int(offset) + 1} {log}"
    else:
        cmd = f"cat {log}"
    res = await host.sh(f"{cmd} 2>/dev/null", check=False)
    return res.stdout


async def console_size(host: Host, host_cfg: HostConfig, name: str) -> int:
    """The console log's size in bytes (0 when there is none yet)."""
    log = shlex.quote(vm_paths(host_cfg, name).console_log)
    res = await host.sh(f"stat -c %s {log} 2>/dev/null || echo 0", check=False)
    text = res.stdout.strip()
    return int(text) if text.isdigit() else 0


def spec_json(spec: VMSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2)
