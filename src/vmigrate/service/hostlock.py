"""VM locks on the hosts: a lock file in the VM's runtime directory.

The store locks a VM for the jobs of one controller (one ``$VMIGRATE_HOME``).
Nothing in it stops a second controller, with another store, from acting on the
same VM through the same inventory. The lock file does: a job takes it on both
hosts (source first, then destination) before its first side effect and
releases it at its end; a VM command that changes state checks it first.

The file ``<data_dir>/vms/<vm>/vmigrate.lock`` names the job and the controller
that holds it::

    vmigrate-vm-lock 1
    job 3f2a9c0d11e4
    controller 5b0c...        (the id in $VMIGRATE_HOME/controller-id)
    host ctl-a                (the controller machine's name, for people)
    pid 12345
    since 1796677200
    vm g1

It is taken atomically with ``link(2)``: the content is written to a private
temporary file, which is then hard-linked under the lock's name (``ln -T``
fails if the name exists, whatever it is), so a reader never sees a partial
lock. Every host command is a fixed script given its values as arguments.

A lock whose controller id is ours and whose job our store says has ended (or
never knew: a job row is written before its lock is taken) is stale and is
removed. A lock of another controller is never removed by vmigrate: the error
names it and its file, for the operator who knows that controller is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmigrate.config import HostConfig
from vmigrate.errors import CommandError, ConflictError, HostError, StoreError
from vmigrate.hosts import Host, HostPool
from vmigrate.qemu.process import vm_paths
from vmigrate.store import JobRecord, Store

MAGIC = "vmigrate-vm-lock 1"
LOCK_NAME = "vmigrate.lock"
CONTROLLER_ID_FILE = "controller-id"

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CONTROLLER_ID = re.compile(r"[0-9a-f]{32}")

#: exit status of the scripts when the lock is held (its content on stdout)
_HELD = 10

# $1 the VM's directory, $2 the lock file, $3 a temporary name next to it; the
# content on stdin. 0: taken; 10: held (its content on stdout); other: failed.
_ACQUIRE = """
set -u
dir=$1 lock=$2 tmp=$3
mkdir -p -- "$dir" || exit 3
umask 077
if ! cat > "$tmp"; then rm -f -- "$tmp"; exit 3; fi
if ln -T -- "$tmp" "$lock" 2>/dev/null; then rm -f -- "$tmp"; exit 0; fi
rm -f -- "$tmp"
if [ -e "$lock" ] || [ -L "$lock" ]; then cat -- "$lock" 2>/dev/null; exit 10; fi
echo "cannot create $lock" >&2
exit 3
"""

# $1 the lock file: its content on stdout with status 10, or status 0 when none
_READ = """
lock=$1
if [ -e "$lock" ] || [ -L "$lock" ]; then cat -- "$lock" 2>/dev/null; exit 10; fi
exit 0
"""

# $1 the lock file, $2 job, $3 controller: removed only if it names both; then the
# VM's directory goes too if nothing else is in it
_RELEASE = """
set -u
lock=$1 job=$2 ctl=$3
[ -f "$lock" ] || exit 0
grep -qxF "job $job" -- "$lock" || exit 0
grep -qxF "controller $ctl" -- "$lock" || exit 0
rm -f -- "$lock" || exit 3
rmdir -- "$(dirname -- "$lock")" 2>/dev/null
exit 0
"""


class VmLockedError(ConflictError):
    """The VM's lock on a host is held by a job (of this or another controller):
    refused, nothing was changed. ``holder`` is None when the lock file could
    not be read."""

    def __init__(self, message: str, *, host: str, path: str,
                 holder: LockInfo | None) -> None:
        self.host = host
        self.path = path
        self.holder = holder
        super().__init__(message)


# -- the controller's identity ------------------------------------------------------------


def controller_id(home: Path) -> str:
    """This controller's id: ``home/controller-id``, created at first use (32 hex
    digits, mode 0600; ``home`` is created 0700 if missing). Two processes that
    create it at once agree on the first one written. Raises :class:`StoreError`
    if it cannot be created or holds something else; nothing is overwritten."""
    path = home / CONTROLLER_ID_FILE
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            value = uuid.uuid4().hex
            with os.fdopen(fd, "w") as fh:
                fh.write(value + "\n")
            return value
        for _ in range(50):  # another process created it a moment ago: wait for its line
            with open(path, encoding="ascii", errors="replace") as fh:
                text = fh.read()
            if text.endswith("\n"):
                break
            time.sleep(0.01)
    except OSError as exc:
        raise StoreError(f"cannot create the controller id {path}: {exc}") from exc
    value = text.strip()
    if not _CONTROLLER_ID.fullmatch(value):
        raise StoreError(f"{path} does not hold a controller id (32 hex digits): remove it "
                         "only if no job of this controller holds a VM lock")
    return value


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64]
    return name or "unknown"


# -- the lock file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    """Who holds a VM's lock on a host."""

    job: str
    controller: str
    host: str = "unknown"
    pid: int | None = None
    since: float | None = None
    vm: str = ""

    def render(self) -> str:
        lines = [MAGIC, f"job {self.job}", f"controller {self.controller}",
                 f"host {self.host}"]
        if self.pid is not None:
            lines.append(f"pid {self.pid}")
        if self.since is not None:
            lines.append(f"since {int(self.since)}")
        if self.vm:
            lines.append(f"vm {self.vm}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.since))
                if self.since is not None else "")
        pid = f" pid {self.pid}" if self.pid is not None else ""
        return (f"job {self.job} of controller {self.controller[:12]} on "
                f"{self.host}{pid}{when}")


def parse_lock(text: str) -> LockInfo:
    """A lock file's content; :class:`ValueError` for anything but our format."""
    lines = text.splitlines()
    if not lines or lines[0] != MAGIC:
        raise ValueError("not a vmigrate VM lock (or a version this vmigrate does not know)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(" ")
        if not sep or key in fields or not _TOKEN.fullmatch(value):
            raise ValueError(f"bad line {line[:80]!r}")
        fields[key] = value
    if "job" not in fields or "controller" not in fields:
        raise ValueError("no job or controller")
    try:
        pid = int(fields["pid"]) if "pid" in fields else None
        since = float(fields["since"]) if "since" in fields else None
    except ValueError as exc:
        raise ValueError(f"bad pid or time: {exc}") from None
    return LockInfo(job=fields["job"], controller=fields["controller"],
                    host=fields.get("host", "unknown"), pid=pid, since=since,
                    vm=fields.get("vm", ""))


def lock_path(cfg: HostConfig, vm: str) -> str:
    """Where ``vm``'s lock lives on the host ``cfg``."""
    return f"{vm_paths(cfg, vm).dir}/{LOCK_NAME}"


def _token(value: str, what: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ConflictError(f"{what} {value!r} cannot name a lock (letters, digits, . _ -)")
    return value


def job_lock_error(vm: str, job: JobRecord) -> ConflictError:
    """The refusal of a request on ``vm`` while ``job`` (of this controller) locks it."""
    how = "runs" if job.active else "waits for an operator"
    return ConflictError(
        f"VM {vm!r} is locked: job {job.id} {how} (phase {job.phase}; see 'vmigrate job "
        f"show {job.id}'; 'vmigrate job recover' settles a job whose controller died or "
        "that waits for an operator, 'vmigrate job resolve' one an operator decides)")


# -- locks over hosts -------------------------------------------------------------------------


class VmLocks(Protocol):
    """What the services ask of VM locks on hosts (see :class:`HostLocks`)."""

    async def acquire(self, job: str, vm: str, hosts: Sequence[str]) -> None: ...

    async def release(self, job: str, vm: str, hosts: Sequence[str]) -> list[str]: ...

    async def check(self, vm: str, hosts: Sequence[str]) -> None: ...

    async def aclose(self) -> None: ...


class HostLocks:
    """VM lock files on the inventory's hosts, for the controller ``controller`` whose
    jobs are in ``store``. Host sessions come from ``pool`` (one is opened, and
    closed by :meth:`aclose`, when none is given)."""

    def __init__(self, store: Store, controller: str, pool: HostPool, *,
                 own_pool: bool = False) -> None:
        self.store = store
        self.controller = controller
        self.pool = pool
        self._own_pool = own_pool

    async def aclose(self) -> None:
        if self._own_pool:
            await self.pool.aclose()

    def _stale(self, holder: LockInfo) -> bool:
        """Ours, and our store says its job ended (or never started)."""
        if holder.controller != self.controller:
            return False
        job = self.store.find_job(holder.job)
        return job is None or not job.locks_vm

    async def acquire(self, job: str, vm: str, hosts: Sequence[str]) -> None:
        """Take ``vm``'s lock for ``job`` on each of ``hosts``, in order. A lock this
        job already holds counts as taken (recovery takes them again); a stale one is
        removed and taken. Raises :class:`VmLockedError` naming the holder when one is
        held, :class:`HostError` when a host cannot take it; either way the locks this
        call took are released again and nothing else was changed."""
        _token(job, "job id")
        _token(vm, "VM name")
        taken: list[str] = []
        try:
            for name in hosts:
                if await self._acquire_one(job, vm, name):
                    taken.append(name)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release(job, vm, taken)
            raise

    async def _acquire_one(self, job: str, vm: str, name: str) -> bool:
        """True when this call created the lock, False when the job held it already."""
        host, cfg = self.pool.get(name)
        path = lock_path(cfg, vm)
        mine = LockInfo(job=job, controller=self.controller, host=_hostname(),
                        pid=os.getpid(), since=time.time(), vm=vm)
        for _attempt in range(3):
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            res = await host.run(["sh", "-c", _ACQUIRE, "sh", vm_paths(cfg, vm).dir, path,
                                  tmp], check=False, stdin=mine.render().encode())
            if res.status == 0:
                return True
            if res.status != _HELD:
                raise CommandError(name, ["lock", path], res.status, res.stderr)
            holder = self._holder(res.stdout, name, path, vm)
            if holder.job == job and holder.controller == self.controller:
                return False
            if not self._stale(holder):
                raise self._locked(vm, name, path, holder)
            await self._remove(host, path, holder)
        raise ConflictError(f"the lock of {vm} on {name} ({path}) keeps changing: another "
                            "process of this controller takes it; try again")

    def _holder(self, text: str, host: str, path: str, vm: str) -> LockInfo:
        try:
            return parse_lock(text)
        except ValueError as exc:
            raise VmLockedError(
                f"VM {vm} on {host} is locked by a file vmigrate cannot read ({path}: "
                f"{exc}); look at it, and remove it if no controller uses the VM",
                host=host, path=path, holder=None) from None

    def _locked(self, vm: str, host: str, path: str, holder: LockInfo) -> VmLockedError:
        if holder.controller == self.controller:
            how = (f"see 'vmigrate job show {holder.job}'; 'vmigrate job recover' settles a "
                   "job whose controller died or that waits for an operator")
        else:
            how = (f"another controller (another VMIGRATE_HOME) runs that job: settle it "
                   f"there; if that controller is gone for good, remove {path} on {host} "
                   "by hand")
        return VmLockedError(f"VM {vm} is locked on {host} by {holder.describe()}: {how}",
                             host=host, path=path, holder=holder)

    async def _remove(self, host: Host, path: str, holder: LockInfo) -> None:
        await host.run(["sh", "-c", _RELEASE, "sh", path, _token(holder.job, "job id"),
                        _token(holder.controller, "controller id")])

    async def release(self, job: str, vm: str, hosts: Sequence[str]) -> list[str]:
        """Remove ``job``'s lock of ``vm`` on each of ``hosts`` (a lock that is gone, or
        held by someone else, is left as it is). Never raises for a host: returns
        what could not be released, one line per host."""
        failed = []
        for name in hosts:
            try:
                host, cfg = self.pool.get(name)
                await self._remove(host, lock_path(cfg, vm),
                                   LockInfo(job=job, controller=self.controller))
            except (HostError, ConflictError) as exc:
                failed.append(f"releasing the lock of {vm} on {name}: {exc}")
        return failed

    async def check(self, vm: str, hosts: Sequence[str]) -> None:
        """Before a VM command changes state: raise :class:`VmLockedError` if a job
        holds ``vm``'s lock on one of ``hosts``; a stale lock is removed. Changes
        nothing else."""
        for name in hosts:
            host, cfg = self.pool.get(name)
            path = lock_path(cfg, vm)
            res = await host.run(["sh", "-c", _READ, "sh", path], check=False)
            if res.status == 0:
                continue
            if res.status != _HELD:
                raise CommandError(name, ["read lock", path], res.status, res.stderr)
            holder = self._holder(res.stdout, name, path, vm)
            if not self._stale(holder):
                raise self._locked(vm, name, path, holder)
            await self._remove(host, path, holder)
