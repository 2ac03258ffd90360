"""What an assessment measured, and what a prediction says: the plan layer's data.

Plain, frozen pydantic models, so they round-trip through JSON (the store keeps
every assessment; reports keep the prediction a migration started from). No I/O:
``vmigrate.service.assess`` fills :class:`Assessment` from QMP and the hosts;
:mod:`vmigrate.plan.predict` and :mod:`vmigrate.plan.decide` read it.

Units: bytes, bytes per second, seconds, epoch seconds; downtime in milliseconds
(as QEMU and the migration report give it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ASSESSMENT_VERSION = 1

Mode = Literal["live", "online", "cold", "warm"]
MODES: tuple[Mode, ...] = ("live", "online", "cold", "warm")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DirtyWindow(_Frozen):
    """One ``calc-dirty-rate`` measurement."""

    #: seconds the window lasted
    seconds: float = Field(gt=0)
    #: bytes per second the guest dirtied (distinct pages in the window x page size / seconds)
    rate: float = Field(ge=0)


class DiskAssessment(_Frozen):
    """One disk of the VM."""

    device: str
    path: str
    format: str
    virtual_bytes: int = Field(ge=0)
    #: bytes the image holds data for (holes and unallocated clusters excluded)
    allocated_bytes: int = Field(ge=0)
    #: the guest's writes to this disk, bytes/s (``query-blockstats`` delta)
    write_rate: float = Field(default=0.0, ge=0)
    #: bytes the transfer engine sends per allocated byte, from a sample of the data
    #: (all-zero chunks count as nothing, the rest zstd-compressed as the engine does);
    #: None = not sampled (the models then assume 1.0)
    compress_ratio: float | None = Field(default=None, gt=0)
    #: the same file is visible on the destination (shared storage: live is possible)
    shared: bool = False


class LinkAssessment(_Frozen):
    """The migration link between two hosts, probed."""

    source: str
    dest: str
    #: usable bytes/s measured end to end (TCP, receiver side)
    bandwidth: float = Field(gt=0)
    #: round-trip time of the probe's TCP connect, ms
    rtt_ms: float = Field(default=0.0, ge=0)
    #: how long the probe ran, seconds
    probe_s: float = Field(default=0.0, ge=0)


class Assessment(_Frozen):
    """One VM measured at one time (``vmigrate assess``)."""

    v: int = ASSESSMENT_VERSION
    vm: str
    host: str
    #: epoch seconds, when the measurement started
    at: float
    running: bool = True
    memory_bytes: int = Field(ge=0)
    vcpus: int = Field(default=1, ge=1)
    #: share of guest RAM pages that are not all zeros (a sample read with ``pmemsave``);
    #: zero pages cost next to nothing in a pre-copy pass. None = not sampled
    nonzero_fraction: float | None = Field(default=None, ge=0, le=1)
    #: the QEMU version of the source, (major, minor, micro); None when not running
    qemu_version: tuple[int, int, int] | None = None
    #: calc-dirty-rate windows, in the order measured
    dirty: tuple[DirtyWindow, ...] = ()
    #: an upper bound on the bytes the guest dirties however long it runs (its writable
    #: working set), when a longer window showed saturation; None = no bound seen
    dirty_set_bytes: int | None = Field(default=None, ge=0)
    #: the guest's CPU use, percent of its vCPUs (0..100)
    cpu_pct: float = Field(default=0.0, ge=0)
    disks: tuple[DiskAssessment, ...] = ()
    #: the migration link to the destination assessed against, if any
    link: LinkAssessment | None = None
    #: both hosts hold TLS credentials for QEMU's migration stream
    tls: bool = False

    @property
    def dirty_rate(self) -> float:
        """Mean dirty rate over the windows, bytes/s (0 with no window)."""
        if not self.dirty:
            return 0.0
        total_s = sum(w.seconds for w in self.dirty)
        return sum(w.rate * w.seconds for w in self.dirty) / total_s

    @property
    def dirty_peak(self) -> float:
        """Highest window's dirty rate, bytes/s."""
        return max((w.rate for w in self.dirty), default=0.0)

    @property
    def disk_write_rate(self) -> float:
        return sum(d.write_rate for d in self.disks)

    @property
    def allocated_bytes(self) -> int:
        return sum(d.allocated_bytes for d in self.disks)

    @property
    def shared_storage(self) -> bool:
        """Every disk is visible on the destination (or there is none)."""
        return all(d.shared for d in self.disks)


class Figures(_Frozen):
    """The three figures predicted and measured for every migration."""

    total_time_s: float = Field(ge=0)
    downtime_ms: float = Field(ge=0)
    wire_bytes: int = Field(ge=0)


class ModePrediction(_Frozen):
    """What one mode is predicted to cost for one VM."""

    mode: Mode
    #: the mode can run at all (live needs shared storage, a running VM ...)
    feasible: bool = True
    #: why it cannot (when not feasible)
    reason: str | None = None
    #: calibrated figures (None when not feasible)
    figures: Figures | None = None
    #: the model's own figures before calibration (what calibration compares against)
    raw: Figures | None = None
    #: live/online: the policy will have to switch to post-copy (or pause the guest)
    postcopy: bool = False
    #: live/online: pre-copy alone reaches the downtime limit
    converges: bool = True
    #: live/online: the policy will abort (timeout or abort step) instead of finishing
    aborts: bool = False
    #: live/online: predicted pre-copy iterations; warm: predicted rounds
    iterations: int | None = None
    #: the policy steps / rounds the model expects, one line each
    steps: tuple[str, ...] = ()
    #: how sure: relative spread (e.g. 0.3 = +-30 %) from calibration history, None = no history
    uncertainty: float | None = None
    #: facts the model relied on or assumed, one line each
    notes: tuple[str, ...] = ()
