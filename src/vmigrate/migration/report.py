"""The migration report: QEMU's own figures next to independent ones."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

REPORT_VERSION = 1

Status = Literal["running", "completed", "failed", "cancelled", "needs-operator"]


class Verification(BaseModel):
    """What was checked after the switchover."""

    dest_running: bool | None = None
    #: the guest answered the probe's ping after it ran on the destination (lab guests
    #: with an address; None where there is no probe)
    answers_ping: bool | None = None
    #: lab guests running memtouch: "ok", "fail", or None where not applicable
    memcheck: str | None = None
    memcheck_line: str | None = None
    #: a kernel crash or a fresh boot seen on the destination console (the line)
    guest_crash: str | None = None
    #: when no verdict came in time, or the guest crashed: the console's last lines
    console_tail: list[str] | None = None
    #: lab guests running diskwrite, cold/warm: device -> {"acked": last ack on the
    #: source, "found": valid records 1..n on the destination copy}
    records: dict[str, dict[str, int]] | None = None
    source_running: bool | None = None  # after a rollback: the source runs on
    dest_clean: bool | None = None  # after a rollback: nothing left on the destination

    @property
    def failed(self) -> bool:
        """The VM moved but did not arrive intact (crashed, or a page check failed)."""
        lost = any(r["found"] < r["acked"] for r in (self.records or {}).values())
        return (self.guest_crash is not None or self.memcheck in ("fail", "exited")
                or self.answers_ping is False or lost)


class MigrationReport(BaseModel):
    """Everything a migration measured. Serialised with ``model_dump(mode="json")``."""

    v: int = REPORT_VERSION
    job: str
    vm: str
    mode: str
    source: str
    dest: str
    status: Status = "running"
    phase: str = "begin"
    error: str | None = None
    policy: str = "balanced"
    policy_description: str = ""
    steps: list[dict[str, Any]] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    tls: bool = True
    started_at: float = 0.0
    total_time_s: float | None = None
    #: live/online: seconds of total_time_s spent checking the guest once it ran on the
    #: destination (waiting for its ping, the lab guest's memory check, its console);
    #: the migration itself took total_time_s - checks_s
    checks_s: float | None = None
    qemu_total_time_ms: int | None = None
    qemu_downtime_ms: int | None = None
    observed_downtime_ms: float | None = None
    probe: dict[str, Any] | None = None
    bytes_transferred: int | None = None
    ram_bytes: int | None = None
    iterations: int | None = None
    max_throttle_pct: int = 0
    postcopy: bool = False
    postcopy_time_s: float | None = None
    postcopy_recoveries: int = 0
    paused_guest: bool = False
    #: online migration: one entry per disk (source, target, bytes, time, throughput)
    disks: list[dict[str, Any]] = Field(default_factory=list)
    verification: Verification = Field(default_factory=Verification)
    #: what the plan predicted before the migration started (``vmigrate.service.planning.
    #: prediction_record``): mode, figures, raw figures, chosen_by, explanation; None when
    #: no assessment of this route was at hand
    prediction: dict[str, Any] | None = None
    cleanup_errors: list[str] = Field(default_factory=list)
