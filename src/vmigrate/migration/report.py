"""The migration report, version 2: QEMU's own figures next to independent ones.

One shape for every mode. What differs between modes is which parts are
filled, never what a field means:

* ``memory`` -- the memory migration (live, online): policy, QEMU's downtime,
  bytes, iterations, post-copy; None for cold and warm, which move no memory.
* ``disks`` -- one :class:`DiskFigures` per disk that moved (online, cold,
  warm), the same fields in every mode; empty for live (shared storage).
* ``bytes_transferred`` -- everything that crossed the network: the memory
  stream plus every disk's wire bytes.
* ``observed_downtime_ms`` -- measured from outside (the lab's 1 ms probe), or,
  for cold and warm without a probe, from the source stop to the destination
  running.
* ``checks`` -- what the verifiers checked, each with its verdict;
  ``verification`` is the same verdicts as fields, for scripts.
* ``steps`` -- what the convergence policy did (live, online) or the rounds of
  the copy (warm), in order.

Stored reports of version 1 (before the engine of issue 11) still load:
:func:`load_report` upgrades them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, Field, ValidationError

from vmigrate.errors import StoreError

REPORT_VERSION: Final = 2

Status = Literal["running", "completed", "failed", "cancelled", "needs-operator"]


class MemoryFigures(BaseModel):
    """The memory migration (pre-copy, post-copy) as QEMU and the controller saw it."""

    policy: str = ""
    policy_description: str = ""
    qemu_total_time_ms: int | None = None
    #: QEMU's own downtime figure (the final stop-and-copy, or the post-copy switch)
    qemu_downtime_ms: int | None = None
    #: memory stream bytes on the wire
    bytes: int | None = None
    ram_bytes: int | None = None
    iterations: int | None = None
    max_throttle_pct: int = 0
    postcopy: bool = False
    postcopy_time_s: float | None = None
    postcopy_recoveries: int = 0
    #: the policy paused the guest to finish the copy
    paused_guest: bool = False


class DiskFigures(BaseModel):
    """One disk that moved, whatever moved it (mirror, copy, rounds)."""

    source: str
    format: str
    virtual_size: int
    source_allocated: int
    target: str
    target_format: str
    #: image bytes sent as data (zero and unallocated ranges are not data)
    data_bytes: int = 0
    #: bytes that crossed the network for this disk
    wire_bytes: int = 0
    zero_bytes: int | None = None
    #: image bytes the destination already held (a resumed copy)
    skipped_bytes: int | None = None
    resent_bytes: int = 0
    #: seconds the disk took to copy (a mirror: until it was in sync, "ready")
    seconds: float | None = None
    #: a mirror: seconds until ready; same as ``seconds``
    ready_s: float | None = None
    #: a mirror: seconds to complete it at the switchover (the guest was paused)
    handover_s: float | None = None
    #: Mbit/s of data over the copy time
    mbps: float | None = None
    #: "full" (every byte re-read on the destination and checked), "journal", or
    #: "mirror" (QEMU's mirror kept it in sync; not independently re-read)
    verified: str | None = None
    source_deleted: bool = False


class Check(BaseModel):
    """One verdict of a verifier."""

    name: str
    #: True passed, False failed, None could not be checked (the detail says why)
    ok: bool | None
    detail: str = ""
    #: when it ran: "source-stopped" (before the destination runs: a failure rolls
    #: back) or "after-switch" (the guest runs on the destination)
    when: Literal["source-stopped", "after-switch"] = "after-switch"
    #: seconds the check took
    seconds: float | None = None


class Verification(BaseModel):
    """The checks' verdicts as fields, for scripts (``checks`` has the details)."""

    dest_running: bool | None = None
    #: the guest answered the probe's ping after it ran on the destination (lab guests
    #: with an address; None where there is no probe)
    answers_ping: bool | None = None
    #: lab guests running memtouch: "ok", "fail", "exited", "none" (no verdict in time)
    memcheck: str | None = None
    memcheck_line: str | None = None
    #: a kernel crash or a fresh boot seen on the destination console (the line)
    guest_crash: str | None = None
    #: when no verdict came in time, or the guest crashed: the console's last lines
    console_tail: list[str] | None = None
    #: lab guests running diskwrite: device -> {"acked": last ack on the source,
    #: "found": valid records 1..n on the destination's disk}
    records: dict[str, dict[str, int]] | None = None
    #: after a rollback: the source runs on / nothing is left on the destination
    source_running: bool | None = None
    dest_clean: bool | None = None

    @property
    def failed(self) -> bool:
        """The VM moved but did not arrive intact (crashed, a check failed, silent)."""
        lost = any(r["found"] < r["acked"] for r in (self.records or {}).values())
        return (self.guest_crash is not None or self.memcheck in ("fail", "exited")
                or self.answers_ping is False or lost)


class StepEntry(BaseModel):
    """One thing the policy did (or skipped), or one round of a warm copy."""

    t: float
    iteration: int
    action: str
    detail: str
    taken: bool = True


class AuditHead(BaseModel):
    """The audit log's head after a job: its last record (see :mod:`vmigrate.audit`)."""

    seq: int
    #: hex SHA-256 of the record's line (what the next record's ``prev`` holds)
    hash: str
    #: fingerprint of the key that signed it
    key: str | None = None


class MigrationReport(BaseModel):
    """Everything a migration measured. Serialised with ``model_dump(mode="json")``."""

    v: Literal[2] = 2
    job: str
    vm: str
    mode: str
    #: the two strategies the mode is made of
    memory_strategy: str = ""
    storage_strategy: str = ""
    source: str
    dest: str
    status: Status = "running"
    phase: str = "begin"
    error: str | None = None
    #: a job refused in begin (nothing was started): the exit status of its error (2 a
    #: wrong request, 3 a missing prerequisite, 7 a host key); None otherwise
    exit_status: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    #: the memory and NBD streams used TLS (cold and warm: their own AEAD, so False)
    tls: bool = True
    #: how every stream of the job was protected: "tls", "aes-256-gcm" ..., or "none"
    stream_security: str = "tls"
    started_at: float = 0.0
    total_time_s: float | None = None
    #: seconds of total_time_s spent checking the guest once it ran on the destination;
    #: the migration itself took total_time_s - checks_s
    checks_s: float | None = None
    observed_downtime_ms: float | None = None
    #: after the switch: ms from the destination running to the guest's first answer
    #: to the probe (lab guests), and whether its NICs were announced
    answer_after_switch_ms: float | None = None
    announced: bool = False
    probe: dict[str, Any] | None = None
    #: everything on the wire: the memory stream plus every disk
    bytes_transferred: int | None = None
    memory: MemoryFigures | None = None
    disks: list[DiskFigures] = Field(default_factory=list)
    steps: list[StepEntry] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    verification: Verification = Field(default_factory=Verification)
    #: what the plan predicted before the migration started (see
    #: ``vmigrate.service.planning.prediction_record``); None without an assessment
    prediction: dict[str, Any] | None = None
    #: things worth knowing that are not errors (a cancel that came too late ...)
    notes: list[str] = Field(default_factory=list)
    cleanup_errors: list[str] = Field(default_factory=list)
    recovered: bool = False
    #: the audit log's head after the job (its last record); None until the job ends
    audit_head: AuditHead | None = None
    #: where the hosts of the job keep their witness of that head (``host:path``)
    audit_witnesses: list[str] = Field(default_factory=list)

    def add_check(self, check: Check) -> None:
        """Keep a verdict (a second verdict of the same name replaces the first)."""
        self.checks = [c for c in self.checks if c.name != check.name] + [check]

    @property
    def downtime_ms(self) -> float | None:
        """The best downtime figure: observed from outside, else QEMU's."""
        if self.observed_downtime_ms is not None:
            return self.observed_downtime_ms
        if self.memory is not None and self.memory.qemu_downtime_ms is not None:
            return float(self.memory.qemu_downtime_ms)
        return None


_V1_MEMORY = ("qemu_total_time_ms", "qemu_downtime_ms", "iterations", "max_throttle_pct",
              "postcopy", "postcopy_time_s", "postcopy_recoveries", "paused_guest",
              "ram_bytes")


def _upgrade_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 report (one shape per mode) in version 2's shape."""
    old = dict(data)
    mode = str(old.get("mode", ""))
    memory_mode = mode in ("live", "online")
    disks: list[dict[str, Any]] = []
    disk_wire = 0
    for d in old.get("disks") or []:
        if not isinstance(d, Mapping):
            continue
        if memory_mode:  # a mirror: "bytes" counted holes too; "wire_bytes" (later) did not
            wire = int(d.get("wire_bytes", d.get("bytes") or 0) or 0)
            data_bytes = min(int(d.get("bytes") or 0), int(d.get("source_allocated") or 0))
            entry = {"data_bytes": data_bytes, "wire_bytes": wire,
                     "seconds": d.get("ready_s"), "ready_s": d.get("ready_s"),
                     "handover_s": d.get("handover_s"), "mbps": d.get("mirror_mbps"),
                     "verified": "mirror"}
        else:
            wire = int(d.get("wire_bytes") or 0)
            entry = {k: d.get(k) for k in ("data_bytes", "wire_bytes", "zero_bytes",
                                           "skipped_bytes", "resent_bytes", "verified")}
            entry["seconds"] = d.get("transfer_s")
            entry = {k: v for k, v in entry.items() if v is not None}
        disk_wire += wire
        disks.append({"source": d.get("source", ""), "format": d.get("format", ""),
                      "virtual_size": d.get("virtual_size", 0),
                      "source_allocated": d.get("source_allocated", 0),
                      "target": d.get("target", ""), "target_format": d.get("target_format", ""),
                      "source_deleted": bool(d.get("source_deleted")), **entry})
    total = old.get("bytes_transferred")
    memory = None
    if memory_mode:
        memory = {k: old[k] for k in _V1_MEMORY if k in old and old[k] is not None}
        memory.update(policy=old.get("policy", ""),
                      policy_description=old.get("policy_description", ""), bytes=total)
        if total is not None:
            total = int(total) + disk_wire
    new: dict[str, Any] = {k: old[k] for k in (
        "job", "vm", "mode", "source", "dest", "status", "phase", "error", "options", "tls",
        "started_at", "total_time_s", "checks_s", "observed_downtime_ms", "probe",
        "prediction", "cleanup_errors", "recovered") if k in old}
    new.update(v=REPORT_VERSION, memory=memory, disks=disks, bytes_transferred=total,
               steps=[s for s in old.get("steps") or [] if isinstance(s, Mapping)],
               verification=old.get("verification") or {},
               stream_security="tls" if old.get("tls", True) and memory_mode else (
                   "aes-256-gcm" if not memory_mode else "none"))
    return new


def load_report(data: Mapping[str, Any]) -> MigrationReport:
    """A stored report (version 1 or 2) as a :class:`MigrationReport`.

    Raises :class:`StoreError` for an unknown version or a report that does not
    validate."""
    version = data.get("v", 1)
    try:
        if version == 1:
            return MigrationReport.model_validate(_upgrade_v1(data))
        if version == REPORT_VERSION:
            return MigrationReport.model_validate(dict(data))
    except ValidationError as exc:
        raise StoreError(f"migration report of job {data.get('job')!r} does not load: "
                         f"{exc.errors()[0]['msg']}") from exc
    raise StoreError(f"migration report version {version!r} is unknown (this vmigrate reads "
                     f"1 and {REPORT_VERSION})")
