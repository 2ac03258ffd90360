"""The hypervisor seam: everything the migration engine asks of a host and of a VM.

Two interfaces, one narrow and typed each:

* :class:`Driver` -- one host: start, stop and find a VM's hypervisor process,
  its console, the images in its pools, what the host can reach.
* :class:`Monitor` -- one VM's control channel (QEMU's QMP, or libvirt's
  passthrough): run state, migration (incoming, migrate, statistics, parameters,
  capabilities, post-copy, pause and recovery), block mirrors, NBD exports,
  dirty bitmaps, network announcements, events.

The engine (:mod:`vmigrate.migration`) uses nothing else to reach a hypervisor,
so a second driver (libvirt-managed hosts) fits in without touching the phase
code, and the unit tests drive the whole protocol through the fakes of
:mod:`vmigrate.testing.fakehv`. The convergence controller reads one statistics
type, :class:`~vmigrate.plan.convergence.Sample`, whatever the driver.

Errors (see :mod:`vmigrate.errors`): a monitor raises
:class:`~vmigrate.errors.QmpCommandError` when the hypervisor refused a command
(nothing changed) and :class:`~vmigrate.errors.QmpConnectionError` when the
channel is gone or did not answer (the command may or may not have run; the
next call connects again). A driver raises
:class:`~vmigrate.errors.HostUnreachableError` when the host cannot be reached
(the next call tries again) and :class:`~vmigrate.errors.HostError` /
:class:`~vmigrate.errors.CommandError` when a host command failed.

Implementations: :mod:`vmigrate.drivers.qemu` (our own QEMU processes over SSH
and QMP) and :mod:`vmigrate.testing.fakehv` (in memory).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from vmigrate.config import HostConfig
from vmigrate.pki import TlsFiles
from vmigrate.plan.convergence import Sample
from vmigrate.qemu.cpu import QemuOffer
from vmigrate.qemu.images import ImageFormat, ImageInfo
from vmigrate.qemu.process import VmState
from vmigrate.qemu.spec import CpuSpec, VMSpec

__all__ = [
    "BlockJob",
    "Driver",
    "EventWaiter",
    "ImageFormat",
    "ImageInfo",
    "Monitor",
    "NbdAddress",
    "Sample",
    "VmState",
]

#: migration states in which the guest may already run on the destination
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: migration states from which ``migrate_cancel`` still rolls back
CANCELLABLE_STATES = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})


@dataclass(frozen=True)
class BlockJob:
    """One block job as the hypervisor reports it (``query-block-jobs``)."""

    id: str
    #: created | running | paused | ready | standby | waiting | pending | aborting |
    #: concluded | undefined | null
    status: str
    #: a mirror is ready: source and target in sync, writes mirrored from now on
    ready: bool
    #: progress: bytes done and bytes to do (both grow while the guest writes)
    offset: int
    length: int
    #: set once the job failed
    error: str | None = None


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD server listens: a TCP address and port, or a unix socket."""

    host: str | None = None
    port: int | None = None
    unix: str | None = None

    def __post_init__(self) -> None:
        if (self.unix is None) == (self.host is None or self.port is None):
            raise ValueError("an NBD address is either host and port, or a unix socket")


class EventWaiter(Protocol):
    """Events collected by :meth:`Monitor.events`, oldest first."""

    async def wait(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        ...


class Monitor(ABC):
    """A VM's control channel. One per VM and host, shared by everyone who talks to
    that VM through the same :class:`Driver` (QEMU's monitor takes one client at a
    time). It connects on first use and again after the connection was lost.

    ``timeout`` (seconds) bounds how long a call waits for an answer; None is the
    implementation's default.
    """

    vm: str

    # -- the guest ------------------------------------------------------------------

    @abstractmethod
    async def version(self) -> tuple[int, int, int]:
        """The hypervisor's version (QEMU major, minor, micro)."""

    @abstractmethod
    async def run_state(self, *, timeout: float | None = None) -> str:
        """``running``, ``paused``, ``inmigrate``, ``postmigrate``, ``shutdown``,
        ``prelaunch`` ... (QEMU's ``query-status``)."""

    @abstractmethod
    async def pause(self) -> None:
        """Stop the guest's CPUs (``stop``)."""

    @abstractmethod
    async def resume(self) -> None:
        """Let the guest run (``cont``): after a pause, after ``-S``, or on the source
        after a completed migration (QEMU takes its disks back)."""

    @abstractmethod
    async def quit(self) -> None:
        """End the hypervisor process; a hang-up is the expected answer and is not an
        error."""

    @abstractmethod
    async def powerdown(self) -> None:
        """Press the ACPI power button."""

    @abstractmethod
    async def reset(self) -> None:
        """Reset the guest (a reboot)."""

    @abstractmethod
    async def set_shutdown_action(self, action: Literal["poweroff", "pause"]) -> None:
        """What a guest power-off does: end the process (default), or pause it with
        its state (bitmaps, exports) kept."""

    @abstractmethod
    async def announce(self, *, initial_ms: int, max_ms: int, rounds: int,
                       step_ms: int) -> None:
        """Send gratuitous announcements of the guest's NICs (RARP), so switches learn
        where it runs now."""

    # -- the guest's hardware (vmigrate.qemu.cpu) -----------------------------------

    @abstractmethod
    async def machine_type(self) -> str:
        """The versioned machine type the guest runs (``pc-i440fx-7.2``), whatever
        alias (``pc``) started it."""

    @abstractmethod
    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        """What the QEMU that runs this VM offers (machine types, CPU models, static
        expansions of ``cpus``): the process's own answer, which may differ from the
        host's binary if QEMU was upgraded since the VM started."""

    # -- migration -------------------------------------------------------------------

    @abstractmethod
    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        """``migrate-set-capabilities``; only before a migration starts."""

    @abstractmethod
    async def set_parameters(self, params: Mapping[str, object]) -> None:
        """``migrate-set-parameters``; also while a migration runs."""

    @abstractmethod
    async def add_tls(self, obj_id: str, directory: str,
                      endpoint: Literal["client", "server"]) -> None:
        """Add x509 credentials from ``directory`` (verify-peer on), named ``obj_id``."""

    @abstractmethod
    async def add_authz(self, obj_id: str, identity: str) -> None:
        """Add an ``authz-simple`` object named ``obj_id`` allowing the one x509
        distinguished name ``identity`` (see :func:`vmigrate.pki.x509_dn`): a server
        endpoint given it as ``tls-authz`` (migration parameter, NBD server) refuses
        every client certificate with another subject."""

    @abstractmethod
    async def remove_object(self, obj_id: str) -> None:
        """Remove an object added by :meth:`add_tls` or :meth:`add_authz`."""

    @abstractmethod
    async def listen(self, uri: str) -> None:
        """Destination started with an incoming migration deferred: listen on ``uri``
        (``tcp:ADDR:PORT``). A taken port raises :class:`QmpCommandError`."""

    @abstractmethod
    async def listen_recover(self, uri: str) -> None:
        """Destination in ``postcopy-paused``: listen on ``uri`` for the source's
        resume (out-of-band: answered while the guest waits on a page)."""

    @abstractmethod
    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        """Source: start migrating to ``uri``; ``resume`` continues a paused post-copy
        over a new connection."""

    @abstractmethod
    async def migration(self, *, timeout: float | None = None) -> Sample:
        """The migration's statistics now (``query-migrate``), with ``t`` = 0: the
        caller sets the time. A migration never started has status ``none``."""

    @abstractmethod
    async def cancel_migration(self) -> None:
        """``migrate_cancel``: before the switchover the source keeps the guest."""

    @abstractmethod
    async def continue_migration(self, state: str) -> None:
        """Let a migration paused at ``state`` (``pre-switchover``) go on."""

    @abstractmethod
    async def start_postcopy(self) -> None:
        """Switch to post-copy: the guest runs on the destination from now on."""

    @abstractmethod
    async def pause_migration(self, *, timeout: float | None = None) -> None:
        """``migrate-pause`` (out-of-band): a post-copy whose link failed pauses, to be
        resumed by :meth:`listen_recover` and :meth:`migrate` (``resume``)."""

    @abstractmethod
    def events(self, *names: str) -> AbstractContextManager[EventWaiter]:
        """Collect the named events while the block runs. Events only wake a waiting
        caller early: a lost connection loses them, so callers also poll."""

    # -- block devices, NBD, bitmaps --------------------------------------------------

    @abstractmethod
    async def nbd_server_start(self, address: NbdAddress, *, tls_id: str | None = None,
                               tls_authz: str | None = None,
                               max_connections: int | None = None) -> None:
        """Start the VM's NBD server (one per VM). ``tls_authz``: the id of an object
        added by :meth:`add_authz` (only that client may connect); ``max_connections``:
        the server stops accepting clients while that many are connected. A taken
        port raises :class:`QmpCommandError`."""

    @abstractmethod
    async def nbd_server_stop(self) -> None:
        """Stop the NBD server and remove its exports."""

    @abstractmethod
    async def export_add(self, export_id: str, node: str, name: str, *, writable: bool,
                         bitmaps: Sequence[str] = ()) -> None:
        """Export block node ``node`` as NBD export ``name`` (with dirty bitmaps)."""

    @abstractmethod
    async def export_del(self, export_id: str) -> None:
        """Remove an export."""

    @abstractmethod
    async def nbd_client_add(self, node: str, address: NbdAddress, export: str, *,
                             tls_id: str | None = None) -> None:
        """Add block node ``node``: a client of NBD export ``export`` at ``address``."""

    @abstractmethod
    async def node_del(self, node: str) -> None:
        """Remove a block node added by :meth:`nbd_client_add`."""

    @abstractmethod
    async def mirror(self, job: str, device: str, target: str, *,
                     speed: int | None = None) -> None:
        """Start mirroring node ``device`` into node ``target`` (whole disk, holes as
        zeroes), as job ``job``; the job stays after it ends until dismissed.
        ``speed``: at most this many bytes/s (None: as fast as it goes)."""

    @abstractmethod
    async def block_jobs(self, *, timeout: float | None = None) -> list[BlockJob]:
        """Every block job of the VM now."""

    @abstractmethod
    async def cancel_block_job(self, job: str, *, force: bool = False) -> None:
        """Cancel ``job``. A ready mirror without ``force`` completes: what is left is
        copied and the target is left consistent."""

    @abstractmethod
    async def dismiss_job(self, job: str) -> None:
        """Remove a concluded job."""

    @abstractmethod
    async def bitmaps_transaction(self, add: Sequence[tuple[str, str]],
                                  disable: Sequence[tuple[str, str]] = ()) -> None:
        """In one transaction: add a dirty bitmap ``(node, name)`` for each of ``add``
        and disable each of ``disable``, so that no write falls between them."""

    @abstractmethod
    async def disable_bitmap(self, node: str, name: str) -> None:
        """Stop a dirty bitmap from recording writes."""

    @abstractmethod
    async def remove_bitmap(self, node: str, name: str) -> None:
        """Drop a dirty bitmap."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect (the next call connects again)."""


class Driver(ABC):
    """One host, as the engine sees it.

    ``config`` is the host's inventory entry (its name, migration address, pools,
    TLS directory and data directory are read from it).
    """

    def __init__(self, config: HostConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    # -- the host ---------------------------------------------------------------------

    @abstractmethod
    async def check_reachable(self) -> None:
        """Return once the host answered; :class:`HostUnreachableError` otherwise."""

    @abstractmethod
    async def can_reach(self, address: str) -> bool:
        """Whether the host reaches ``address`` now (one ping of a second)."""

    @abstractmethod
    async def cut_connections(self, address: str, port: int) -> None:
        """Close the host's TCP connections to ``address:port`` (so nothing waits on a
        link that is gone)."""

    @abstractmethod
    async def missing(self, paths: Sequence[str]) -> list[str]:
        """Which of ``paths`` do not exist on the host."""

    @abstractmethod
    async def tls_missing(self) -> list[str]:
        """The TLS credential files QEMU needs that the host lacks (all present: [])."""

    @abstractmethod
    async def tls_files(self) -> TlsFiles:
        """The public certificates in the host's TLS directory (CA, server, client; never
        a key). :class:`HostError` when one cannot be read."""

    # -- VMs ------------------------------------------------------------------------

    @abstractmethod
    async def vm_state(self, vm: str) -> VmState:
        """What the VM's hypervisor process says (``STOPPED``: no process;
        ``UNKNOWN``: the host or the monitor did not answer)."""

    @abstractmethod
    async def vm_exists(self, vm: str) -> bool:
        """Whether a hypervisor process of ``vm`` runs on the host (whatever its run
        state)."""

    @abstractmethod
    async def start_vm(self, spec: VMSpec, *, incoming: bool = False,
                       held: bool = False) -> None:
        """Start ``spec``: booting, or (``incoming``) waiting for a migration whose
        listening address is set later by :meth:`Monitor.listen`. ``held``: the guest
        does not run until :meth:`Monitor.resume` (QEMU's ``-S``)."""

    @abstractmethod
    async def stop_vm(self, spec: VMSpec, *, force: bool = False,
                      timeout: float = 30.0) -> bool:
        """Stop the VM: ACPI power-down and wait ``timeout`` (a guest that does not
        power off raises :class:`StateError` and runs on), or with ``force`` end the
        process (quit, then signals). False when it was not running."""

    @abstractmethod
    async def remove_vm_dir(self, vm: str) -> None:
        """Delete the VM's runtime files on the host (never its disks)."""

    @abstractmethod
    def monitor(self, vm: str) -> Monitor:
        """The VM's monitor (see :class:`Monitor`); the same object for the same VM
        until :meth:`close`."""

    @abstractmethod
    async def console(self, vm: str, *, offset: int = 0, lines: int | None = None) -> str:
        """The VM's serial console log from byte ``offset`` on (or its last ``lines``);
        empty when there is none."""

    @abstractmethod
    async def console_size(self, vm: str) -> int:
        """The console log's size in bytes (0 when there is none)."""

    @abstractmethod
    async def qemu_offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        """What the host's QEMU binary offers with the host's accelerator: its machine
        types, its CPU models with the features the host cannot give, and a static
        expansion of each of ``cpus`` (asked of a probe that runs no guest:
        :mod:`vmigrate.qemu.probe`). :class:`CommandError` when the probe fails."""

    def runtime_dir(self, vm: str) -> str:
        """Where the VM's runtime files live on the host."""
        return f"{self.config.data_dir}/vms/{vm}"

    def disk_node(self, index: int) -> str:
        """The block node name of the VM's disk number ``index`` (0-based, in the
        order of the spec's disks), for mirrors, exports and bitmaps."""
        return f"disk{index}"

    # -- images -----------------------------------------------------------------------

    @abstractmethod
    async def image_info(self, path: str) -> ImageInfo:
        """Format, virtual and allocated size of an image."""

    @abstractmethod
    async def create_image(self, path: str, fmt: ImageFormat, size: int) -> None:
        """Create a thin image; an existing file raises :class:`ConflictError` and is
        not touched."""

    @abstractmethod
    async def remove_image(self, path: str) -> None:
        """Delete an image (absent: nothing to do)."""

    @abstractmethod
    async def free_bytes(self, directory: str) -> int:
        """Bytes free in the filesystem holding ``directory``."""

    @abstractmethod
    async def read_head(self, path: str, length: int) -> bytes:
        """The first ``length`` bytes of a file (fewer if it is shorter)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close the monitors and the connection to the host."""
