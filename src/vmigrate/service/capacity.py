"""What VMs use on a host and what the host offers: the figures fleet placement reads.

For one inventory host, :func:`host_usage` gives:

* **its state**: the one an operator set at run time (kept in the store), else the
  inventory's declared ``state``;
* **the VMs vmigrate knows there** (the store): those whose record names the host,
  and those a migration is moving into it (``incoming``: the job still runs or waits
  for an operator, so the memory is taken on both hosts until it ends). Each counts
  its spec's memory and vCPUs; its QEMU process's CPU use is measured: ``utime +
  stime`` from ``/proc/<pid>/stat``, sampled twice ``interval`` seconds apart on the
  host, over the host's own uptime clock. A VM whose process is gone (stopped,
  crashed) still counts its spec and is flagged ``gone``: it may be started again;
* **the host's own size**: ``MemTotal`` (``/proc/meminfo``) and ``nproc``, used where
  the inventory does not declare ``memory`` or ``cpus``.

Everything the host is asked is one constant shell script (:data:`_SAMPLE_SCRIPT`)
given the interval and the VMs' pidfiles as positional parameters: no text built from
inputs. A PID is trusted only when ``/proc/<pid>/cmdline`` names its pidfile, as
:mod:`vmigrate.qemu.process` does, so a reused PID is never measured as a VM. A host
that cannot be reached does not fail the call: its usage carries the error, its VMs
count their specs and their processes are ``unknown``.

The parsing (:func:`parse_proc_stat`, :func:`parse_meminfo`, :func:`parse_sample`) is
pure and tested on plain text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from vmigrate.config import HostCapacity, HostConfig, Inventory
from vmigrate.errors import HostError, NotFoundError
from vmigrate.hosts import Host, HostPool
from vmigrate.qemu.process import vm_paths
from vmigrate.qemu.spec import VMSpec, parse_spec_json
from vmigrate.store import HostStateRecord, Store

__all__ = [
    "HostSample",
    "HostSource",
    "HostUsage",
    "ProcStat",
    "VmUsage",
    "fleet_usage",
    "host_usage",
    "parse_meminfo",
    "parse_proc_stat",
    "parse_sample",
]

MiB = 1 << 20
#: seconds between the two CPU samples
SAMPLE_INTERVAL = 1.0
#: the longest interval allowed (a sample holds the host's session)
MAX_INTERVAL = 60.0

#: $1 the interval (seconds), $2... the VMs' pidfiles. Prints ``clk``, ``page``,
#: ``nproc`` and ``mem <meminfo line>`` lines, then two samples: ``t<n> <uptime>`` and
#: ``p<n> <index> <the /proc/<pid>/stat line>`` for every pidfile (1-based index) whose
#: PID runs and whose cmdline names that pidfile.
_SAMPLE_SCRIPT = r"""
interval=$1; shift
echo "clk $(getconf CLK_TCK 2>/dev/null)"
echo "page $(getconf PAGESIZE 2>/dev/null)"
echo "nproc $(nproc 2>/dev/null)"
while IFS= read -r line; do
  case "$line" in MemTotal:*|MemAvailable:*) echo "mem $line";; esac
done < /proc/meminfo
sample() {
  n=$1; shift
  read -r up _ < /proc/uptime
  echo "t$n $up"
  i=0
  for pidfile in "$@"; do
    i=$((i + 1))
    pid=
    [ -s "$pidfile" ] && read -r pid 2>/dev/null < "$pidfile"
    case "$pid" in ''|*[!0-9]*) continue;; esac
    [ -r "/proc/$pid/cmdline" ] || continue
    tr '\0' '\n' 2>/dev/null < "/proc/$pid/cmdline" | grep -qxF -- "$pidfile" || continue
    stat=
    read -r stat 2>/dev/null < "/proc/$pid/stat"
    [ -n "$stat" ] && echo "p$n $i $stat"
  done
}
sample 0 "$@"
sleep "$interval"
sample 1 "$@"
"""


class HostSource(Protocol):
    """Where the service gets a host's session (a :class:`~vmigrate.hosts.HostPool`)."""

    def get(self, name: str) -> tuple[Host, HostConfig]: ...


# -- parsing (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """The figures of one ``/proc/<pid>/stat`` line vmigrate reads."""

    pid: int
    #: utime + stime, clock ticks
    ticks: int
    #: resident set, pages
    rss_pages: int


def parse_proc_stat(line: str) -> ProcStat:
    """Parse a ``/proc/<pid>/stat`` line. The command name (field 2, in parentheses)
    may hold spaces and parentheses, so the fields are counted after its last ``)``:
    utime and stime are fields 14 and 15, rss field 24. :class:`ValueError` for a line
    that is not one."""
    head, paren, tail = line.rpartition(")")
    fields = tail.split()
    if not paren or "(" not in head or len(fields) < 22:
        raise ValueError(f"not a /proc/<pid>/stat line: {line[:80]!r}")
    pid = int(head.split("(", 1)[0])
    utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    if pid < 1 or utime < 0 or stime < 0:
        raise ValueError(f"not a /proc/<pid>/stat line: {line[:80]!r}")
    return ProcStat(pid=pid, ticks=utime + stime, rss_pages=max(rss, 0))


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as bytes by field (``MemTotal``, ``MemAvailable``, ...);
    lines that are not ``Name: number [kB]`` are skipped."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        name, colon, rest = line.partition(":")
        words = rest.split()
        if not colon or not words or not words[0].isdigit():
            continue
        scale = 1024 if len(words) > 1 and words[1].lower() == "kb" else 1
        result[name.strip()] = int(words[0]) * scale
    return result


@dataclass(frozen=True)
class HostSample:
    """What :data:`_SAMPLE_SCRIPT` printed, parsed."""

    clk_tck: int = 100
    page_size: int = 4096
    nproc: int | None = None
    #: bytes
    mem_total: int | None = None
    mem_available: int | None = None
    #: seconds between the two samples by the host's uptime; None if not both seen
    elapsed: float | None = None
    #: by pidfile index (0-based): the process in the first and in the second sample
    first: dict[int, ProcStat] = field(default_factory=dict)
    second: dict[int, ProcStat] = field(default_factory=dict)

    def cpu(self, index: int) -> float | None:
        """CPUs pidfile ``index``'s process used between the samples (1.0: one CPU
        busy); None when it was not there both times (or was replaced)."""
        a, b = self.first.get(index), self.second.get(index)
        if a is None or b is None or a.pid != b.pid or not self.elapsed:
            return None
        return max(b.ticks - a.ticks, 0) / self.clk_tck / self.elapsed

    def rss(self, index: int) -> int | None:
        """Bytes resident of pidfile ``index``'s process (the last sample)."""
        stat = self.second.get(index) or self.first.get(index)
        return None if stat is None else stat.rss_pages * self.page_size

    def pid(self, index: int) -> int | None:
        """The PID of pidfile ``index``'s process if it ran at the second sample."""
        stat = self.second.get(index)
        return None if stat is None else stat.pid


def _positive(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


def parse_sample(text: str) -> HostSample:
    """Parse :data:`_SAMPLE_SCRIPT`'s output. Lines it does not know are skipped;
    :class:`ValueError` for a process line that is not one."""
    values: dict[str, Any] = {}
    meminfo: list[str] = []
    uptimes: dict[str, float] = {}
    samples: dict[str, dict[int, ProcStat]] = {"0": {}, "1": {}}
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        rest = rest.strip()
        if key in ("clk", "page", "nproc"):
            values[key] = _positive(rest)
        elif key == "mem":
            meminfo.append(rest)
        elif key in ("t0", "t1"):
            try:
                uptimes[key[1]] = float(rest.split()[0])
            except (ValueError, IndexError):
                continue
        elif key in ("p0", "p1"):
            index, _, stat = rest.partition(" ")
            if not index.isdigit() or int(index) < 1:
                raise ValueError(f"not a process line: {line[:80]!r}")
            samples[key[1]][int(index) - 1] = parse_proc_stat(stat)
    mem = parse_meminfo("\n".join(meminfo))
    elapsed = None
    if "0" in uptimes and "1" in uptimes and uptimes["1"] > uptimes["0"]:
        elapsed = uptimes["1"] - uptimes["0"]
    return HostSample(clk_tck=values.get("clk") or 100, page_size=values.get("page") or 4096,
                      nproc=values.get("nproc"), mem_total=mem.get("MemTotal"),
                      mem_available=mem.get("MemAvailable"), elapsed=elapsed,
                      first=samples["0"], second=samples["1"])


# -- the figures ------------------------------------------------------------------------------

#: a VM's QEMU process: ``running``; ``gone`` (no process: stopped or crashed; its spec
#: still counts); ``unknown`` (not measured: host not reached, or not asked)
ProcessState = Literal["running", "gone", "unknown"]


@dataclass(frozen=True)
class VmUsage:
    """One VM on a host: what its spec takes and what its process was seen to use."""

    name: str
    #: bytes of guest memory (its spec)
    memory: int
    vcpus: int
    process: ProcessState = "unknown"
    pid: int | None = None
    #: CPUs its QEMU process used over the sample (1.0: one CPU busy); None: not measured
    cpu: float | None = None
    #: bytes its QEMU process holds resident; None: not measured
    rss: int | None = None
    #: a migration is moving it into this host (its record still names the source)
    incoming: bool = False

    @property
    def gone(self) -> bool:
        """Its process was looked for and is not there (its spec counts anyway)."""
        return self.process == "gone"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory": self.memory, "vcpus": self.vcpus,
                "process": self.process, "pid": self.pid, "cpu": self.cpu, "rss": self.rss,
                "incoming": self.incoming}


@dataclass(frozen=True)
class HostUsage:
    """A host's state, capacity and load. Sizes are bytes; CPU figures are CPUs."""

    host: str
    state: HostStateRecord
    #: what the inventory declares (None fields: not declared)
    declared: HostCapacity
    vms: tuple[VmUsage, ...] = ()
    #: what the host said about itself (None: not asked, or not reached)
    mem_total: int | None = None
    mem_available: int | None = None
    nproc: int | None = None
    #: the host was asked (``measure``) and answered
    measured: bool = False
    #: why the host could not be measured (None: it was, or was not asked)
    error: str | None = None

    @property
    def memory(self) -> int | None:
        """The host's memory: declared, else measured (``MemTotal``), else None."""
        return self.declared.memory if self.declared.memory is not None else self.mem_total

    @property
    def memory_source(self) -> Literal["inventory", "measured"] | None:
        if self.declared.memory is not None:
            return "inventory"
        return "measured" if self.mem_total is not None else None

    @property
    def cpus(self) -> int | None:
        """The host's CPUs: declared, else measured (``nproc``), else None."""
        return self.declared.cpus if self.declared.cpus is not None else self.nproc

    @property
    def cpus_source(self) -> Literal["inventory", "measured"] | None:
        if self.declared.cpus is not None:
            return "inventory"
        return "measured" if self.nproc is not None else None

    @property
    def reserve_memory(self) -> int:
        return self.declared.reserve_memory

    @property
    def memory_used(self) -> int:
        """Guest memory of every VM counted here (specs, gone ones included)."""
        return sum(vm.memory for vm in self.vms)

    @property
    def memory_free(self) -> int | None:
        """What more VMs may take: memory - reserve - used (negative: overcommitted);
        None when the memory is unknown."""
        memory = self.memory
        return None if memory is None else memory - self.reserve_memory - self.memory_used

    @property
    def vcpus(self) -> int:
        """vCPUs of every VM counted here."""
        return sum(vm.vcpus for vm in self.vms)

    @property
    def cpu_used(self) -> float:
        """CPUs in use: what running VMs' processes used, plus the vCPUs of VMs not
        measured (gone or unknown: counted at their spec)."""
        return sum(vm.cpu if vm.cpu is not None else float(vm.vcpus) for vm in self.vms)

    @property
    def cpu_measured(self) -> float:
        """CPUs the running VMs' processes were seen to use (measured only)."""
        return sum(vm.cpu for vm in self.vms if vm.cpu is not None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state.as_dict(),
            "memory": self.memory, "memory_source": self.memory_source,
            "reserve_memory": self.reserve_memory,
            "memory_used": self.memory_used, "memory_free": self.memory_free,
            "mem_available": self.mem_available,
            "cpus": self.cpus, "cpus_source": self.cpus_source,
            "vcpus": self.vcpus, "cpu_used": round(self.cpu_used, 3),
            "cpu_measured": round(self.cpu_measured, 3),
            "max_migrations_in": self.declared.max_migrations_in,
            "max_migrations_out": self.declared.max_migrations_out,
            "measured": self.measured, "error": self.error,
            "vms": [vm.as_dict() for vm in self.vms],
        }


# -- the service ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Counted:
    name: str
    spec: VMSpec
    incoming: bool


def _vms_on(store: Store, host: str) -> list[_Counted]:
    """The VMs the store places on ``host``, then those moving into it."""
    counted = [_Counted(r.name, parse_spec_json(r.spec_json, what=f"VM {r.name}'s stored spec"),
                        False) for r in store.list_vms() if r.host == host]
    seen = {c.name for c in counted}
    for job in store.list_jobs(active=None):
        if job.locks_vm and job.dest == host and job.vm not in seen:
            try:
                record = store.get_vm(job.vm)
            except NotFoundError:  # a job for a VM since forgotten
                continue
            spec = parse_spec_json(record.spec_json, what=f"VM {record.name}'s stored spec")
            counted.append(_Counted(record.name, spec, True))
            seen.add(job.vm)
    return counted


async def sample_host(host: Host, pidfiles: Sequence[str], interval: float = SAMPLE_INTERVAL
                      ) -> HostSample:
    """Run :data:`_SAMPLE_SCRIPT` on ``host`` for ``pidfiles``: one round trip, the
    two samples ``interval`` seconds apart on the host (no sleep without pidfiles).
    Raises :class:`HostError` when the host cannot run it; changes nothing."""
    if not 0 < interval <= MAX_INTERVAL:
        raise ValueError(f"interval must be above 0 and at most {MAX_INTERVAL:g} s")
    pause = f"{interval:.3f}" if pidfiles else "0"
    res = await host.run(["sh", "-c", _SAMPLE_SCRIPT, "sh", pause, *pidfiles],
                         timeout=interval + 60.0)
    try:
        return parse_sample(res.stdout)
    except ValueError as exc:
        raise HostError(f"host {host.name}: unreadable process figures: {exc}") from exc


async def host_usage(inv: Inventory, store: Store, host: str, *,
                     hosts: HostSource | None = None, measure: bool = True,
                     interval: float = SAMPLE_INTERVAL) -> HostUsage:
    """Host ``host``'s state, capacity and the VMs vmigrate knows on it, measured on the
    host unless ``measure`` is False (then nothing is run: specs and the inventory
    only). ``hosts``: the sessions to use (default: a pool of its own, closed at the
    end). Raises :class:`~vmigrate.errors.NotFoundError` for a host not in the
    inventory; a host that cannot be reached gives a usage with ``error`` set."""
    if not 0 < interval <= MAX_INTERVAL:
        raise ValueError(f"interval must be above 0 and at most {MAX_INTERVAL:g} s")
    declared = inv.host_capacity(host)
    state = store.effective_host_state(host, inv.declared_state(host))
    counted = _vms_on(store, host)

    def usage(sample: HostSample | None, error: str | None = None) -> HostUsage:
        vms = []
        for i, c in enumerate(counted):
            vm = VmUsage(name=c.name, memory=c.spec.memory_mib * MiB, vcpus=c.spec.vcpus,
                         incoming=c.incoming)
            if sample is not None:
                pid = sample.pid(i)
                vm = VmUsage(name=vm.name, memory=vm.memory, vcpus=vm.vcpus,
                             incoming=vm.incoming, process="running" if pid else "gone",
                             pid=pid, cpu=sample.cpu(i) if pid else None,
                             rss=sample.rss(i) if pid else None)
            vms.append(vm)
        return HostUsage(
            host=host, state=state, declared=declared, vms=tuple(vms),
            mem_total=sample.mem_total if sample else None,
            mem_available=sample.mem_available if sample else None,
            nproc=sample.nproc if sample else None, measured=sample is not None, error=error)

    async def measured(source: HostSource) -> HostUsage:
        session, cfg = source.get(host)
        pidfiles = [vm_paths(cfg, c.name).pidfile for c in counted]
        try:
            sample = await sample_host(session, pidfiles, interval)
        except HostError as exc:
            return usage(None, str(exc))
        return usage(sample)

    if not measure:
        return usage(None)
    if hosts is not None:
        return await measured(hosts)
    pool = HostPool(inv)
    try:
        return await measured(pool)
    finally:
        await pool.aclose()


async def fleet_usage(inv: Inventory, store: Store, names: Iterable[str] | None = None, *,
                      hosts: HostSource | None = None, measure: bool = True,
                      interval: float = SAMPLE_INTERVAL) -> list[HostUsage]:
    """:func:`host_usage` of every host in ``names`` (default: the inventory's, in its
    order), measured at the same time; one unreachable host does not hide the others."""
    selected = list(inv.hosts) if names is None else list(names)
    for name in selected:
        inv.host(name)  # NotFoundError before anything runs

    async def every(source: HostSource) -> list[HostUsage]:
        return list(await asyncio.gather(*(
            host_usage(inv, store, name, hosts=source, measure=measure, interval=interval)
            for name in selected)))

    if hosts is not None:
        return await every(hosts)
    pool = HostPool(inv)
    try:
        return await every(pool)
    finally:
        await pool.aclose()
