"""A migration job's typed state: what recovery needs, written before each side effect.

The store keeps one :class:`JobState` per job (JSON in the ``jobs.state``
column). The engine saves it **before** every side effect that recovery must
know about (write-ahead): the phase it enters, each :class:`Undo` it registers
before allocating what that undo releases, the moment it starts the migration,
pauses or stops the source, starts the destination. A controller that dies
leaves the last saved state; ``vmigrate job recover`` reads it (never the audit
log, which is evidence, not state) and settles the job from it and from what
the hosts say now.

Every undo is idempotent (it releases what exists and ignores what does not),
so an undo registered for an allocation that never happened is harmless.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vmigrate.plan.adaptive import Situation
from vmigrate.plan.capabilities import MigrationOptions
from vmigrate.plan.policy import BUILTIN, DEFAULT_POLICY, Policy
from vmigrate.qemu.spec import VMSpec

STATE_VERSION = 1

Mode = Literal["live", "online", "cold", "warm"]
MemoryKind = Literal["precopy", "offline"]
StorageKind = Literal["shared", "mirror", "copy", "rounds"]

#: the modes, as (memory strategy, storage strategy)
MODES: dict[Mode, tuple[MemoryKind, StorageKind]] = {
    "live": ("precopy", "shared"),
    "online": ("precopy", "mirror"),
    "cold": ("offline", "copy"),
    "warm": ("offline", "rounds"),
}


class Phase(StrEnum):
    """The five phases every mode runs (DESIGN.md, "The migration phase protocol")."""

    BEGIN = "begin"
    PREPARE = "prepare"
    PERFORM = "perform"
    FINISH = "finish"
    CONFIRM = "confirm"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Undo(_Model):
    """Something a phase allocated and how to release it: an action name the engine
    knows (``vmigrate.migration.undo``), run again after a crash if need be."""

    action: str
    phase: Phase
    args: dict[str, Any] = Field(default_factory=dict)


class DiskState(_Model):
    """One disk that moves: where it is, where it goes, what exists of it."""

    index: int
    #: the hypervisor's block node of the disk (mirrors, exports, bitmaps)
    node: str
    source: str
    format: str
    virtual_size: int
    allocated: int
    target: str
    target_format: Literal["raw", "qcow2"]
    #: the target exists under its final name and is ours to delete on rollback (until
    #: the VM runs from it)
    created: bool = False


class Assessed(_Model):
    """What the latest assessment said of the guest's memory, for an adaptive policy's
    first plan (bytes, bytes/s; ``at``: when it was measured, epoch seconds)."""

    first_pass: float = Field(ge=0)
    dirty_rate: float = Field(ge=0)
    wss: float = Field(ge=0)
    bandwidth: float = Field(gt=0)
    at: float
    #: what the probe measured the link to carry (None in jobs stored before it was kept)
    link: float | None = Field(default=None, gt=0)

    def situation(self) -> Situation:
        return Situation(remaining=self.first_pass, dirty_rate=self.dirty_rate, wss=self.wss,
                         bandwidth=self.bandwidth, link=self.link)


class JobOptions(_Model):
    """What the operator asked for, kept with the job (recovery needs it too)."""

    mode: Mode
    policy: Policy = Field(default_factory=lambda: BUILTIN[DEFAULT_POLICY])
    #: overrides the policy's starting downtime limit (ms)
    downtime_ms: int | None = None
    #: bytes/s cap for the memory stream and, in cold/warm, each disk's transfer
    bandwidth: int | None = None
    #: multifd channels
    parallel: int | None = None
    compress: Literal["zstd", "xbzrle"] | None = None
    tls: bool = True
    #: a memory stream (live, online) without TLS was asked for on purpose: anyone on the
    #: migration network may connect to the destination's migration port and NBD export
    insecure: bool = False
    #: destination pool for the disks (online, cold, warm); None: "local"
    target_storage: str | None = None
    #: None: each disk keeps its format
    target_format: Literal["raw", "qcow2"] | None = None
    delete_source: bool = False
    #: cold/warm: seconds the guest gets to power off after the ACPI button
    shutdown_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    #: cold/warm: stop the guest hard when it did not power off in time
    force: bool = True
    #: warm: cut over at this wall-clock time (epoch seconds); None: once converged
    cutover_at: float | None = Field(default=None, allow_inf_nan=False)
    cipher: Literal["aes-256-gcm", "sm4-gcm"] = "aes-256-gcm"
    compress_disks: str = "auto"
    #: the VM's tier when the job started, and what it allows the memory migration
    tier: str | None = None
    tier_max_downtime_ms: float | None = None
    postcopy_allowed: bool = True
    #: post-copy is not enabled because the assessment shows pre-copy converges easily
    #: (the tier would allow it)
    postcopy_unneeded: bool = False
    #: an adaptive policy's starting point (None: no assessment, the first pass measures)
    assessed: Assessed | None = None

    def memory_options(self) -> MigrationOptions:
        """The options of the memory stream (live, online)."""
        return MigrationOptions(policy=self.policy, downtime_ms=self.downtime_ms,
                                bandwidth=self.bandwidth, parallel=self.parallel,
                                compress=self.compress, tls=self.tls,
                                postcopy_allowed=self.postcopy_allowed,
                                max_downtime_ms=self.tier_max_downtime_ms)


class JobState(_Model):
    """Everything recovery needs to know about a job (see the module doc)."""

    v: Literal[1] = 1
    job: str
    vm: str
    mode: Mode
    memory: MemoryKind
    storage: StorageKind
    source: str
    dest: str
    options: JobOptions
    phase: Phase = Phase.BEGIN
    #: the VM as it ran on the source, and as it will run on the destination
    spec: VMSpec
    dest_spec: VMSpec
    disks: list[DiskState] = Field(default_factory=list)
    #: registered undos, oldest first (rollback runs them newest first)
    undo: list[Undo] = Field(default_factory=list)

    # -- memory, pre-copy --
    tls_id: str = ""
    #: the x509 DN of the source's client certificate: the only client the destination's
    #: migration port and NBD server accept (``tls-authz``), read at begin
    tls_authz: str = ""
    #: the source QEMU's version (major, minor, micro), read at begin
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    #: capabilities set on both sides (post-copy, pause-before-switchover ...)
    capabilities: dict[str, bool] = Field(default_factory=dict)
    #: where the destination listens (tcp:ADDR:PORT)
    uri: str | None = None
    #: ``migrate`` was sent to the source (or is about to be)
    migrating: bool = False
    #: ``migrate-start-postcopy`` was sent (or is about to be)
    postcopy: bool = False
    #: the policy paused the source guest to finish the copy
    source_paused: bool = False

    # -- memory, offline --
    #: the VM ran on the source when the job began (a stopped VM stays stopped)
    source_was_running: bool = True
    #: the job powered the source guest off (or is about to)
    source_stopped: bool = False
    #: the source QEMU stays after the guest powered off (warm: for the last delta)
    source_kept: bool = False
    #: epoch seconds of the source stop
    stopped_at: float | None = None
    #: the job started the destination VM (or is about to)
    dest_started: bool = False
    #: the destination console's size before our QEMU started there
    dest_log_from: int = 0

    # -- storage --
    #: the destination's NBD server port (online)
    nbd_port: int | None = None
    #: the source's NBD socket (warm)
    source_nbd: str | None = None
    #: warm: dirty bitmaps vmx1..vmxN were created
    bitmaps: int = 0
    #: the source's shutdown action was set to pause (warm)
    shutdown_action_set: bool = False

    # -- the point of no return --
    #: the guest ran on the destination (for post-copy: the switch): from here on the
    #: job only finishes forward
    pnr: bool = False
    #: epoch seconds when it passed
    pnr_at: float | None = None
    #: the store places the VM on the destination
    vm_moved: bool = False
    #: what verifiers noted before the switch (e.g. the source's last memory check)
    notes: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def authz_id(self) -> str:
        """The destination QEMU's ``authz-simple`` object allowing :attr:`tls_authz`."""
        return f"vmigrate-authz-{self.job}"

    def undo_for(self, action: str) -> Undo | None:
        """The registered undo of ``action`` (the newest), if any."""
        return next((u for u in reversed(self.undo) if u.action == action), None)
