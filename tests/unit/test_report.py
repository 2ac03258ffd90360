"""The migration report, version 2, and the loading of stored version-1 reports."""

from __future__ import annotations

from typing import Any

import pytest

from vmigrate.errors import StoreError
from vmigrate.migration.report import (
    Check,
    DiskFigures,
    MemoryFigures,
    MigrationReport,
    load_report,
)

V1_LIVE: dict[str, Any] = {
    "v": 1, "job": "j1", "vm": "g1", "mode": "live", "source": "h1", "dest": "h2",
    "status": "completed", "phase": "confirm", "policy": "balanced",
    "policy_description": "balanced: ...", "tls": True, "total_time_s": 31.1,
    "qemu_downtime_ms": 150, "observed_downtime_ms": 773.0, "bytes_transferred": 629 << 20,
    "ram_bytes": 256 << 20, "iterations": 7, "postcopy": True, "postcopy_recoveries": 1,
    "steps": [{"t": 1.0, "iteration": 2, "action": "downtime", "detail": "300 ms",
               "taken": True}],
    "verification": {"dest_running": True, "memcheck": "ok", "answers_ping": True},
}

V1_COLD: dict[str, Any] = {
    "v": 1, "job": "j2", "vm": "g2", "mode": "cold", "source": "h1", "dest": "h2",
    "status": "completed", "tls": False, "total_time_s": 20.0, "qemu_downtime_ms": None,
    "observed_downtime_ms": 9000.0, "bytes_transferred": 64 << 20,
    "disks": [{"source": "/a.raw", "format": "raw", "virtual_size": 1 << 30,
               "source_allocated": 64 << 20, "target": "/b.raw", "target_format": "raw",
               "data_bytes": 64 << 20, "wire_bytes": 64 << 20, "zero_bytes": 0,
               "skipped_bytes": 0, "resent_bytes": 0, "transfer_s": 3.5,
               "verified": "full", "source_deleted": False}],
    "verification": {"dest_running": True, "records": {"/dev/vda": {"acked": 5,
                                                                    "found": 7}}},
}


def test_version_1_live_report_loads_with_its_memory_figures() -> None:
    r = load_report(V1_LIVE)
    assert r.v == 2 and r.memory is not None
    assert (r.memory.qemu_downtime_ms, r.memory.postcopy, r.memory.postcopy_recoveries,
            r.memory.iterations, r.memory.policy) == (150, True, 1, 7, "balanced")
    assert r.memory.bytes == r.bytes_transferred == 629 << 20  # no disks moved
    assert r.steps[0].action == "downtime" and r.verification.memcheck == "ok"
    assert r.downtime_ms == 773.0 and r.stream_security == "tls"


def test_version_1_cold_report_has_no_memory_and_the_same_disk_fields() -> None:
    r = load_report(V1_COLD)
    assert r.memory is None and r.stream_security == "aes-256-gcm"
    (d,) = r.disks
    assert (d.data_bytes, d.wire_bytes, d.seconds, d.verified) == (64 << 20, 64 << 20, 3.5,
                                                                   "full")
    assert r.verification.records == {"/dev/vda": {"acked": 5, "found": 7}}
    assert set(DiskFigures.model_fields) == set(d.model_dump())


def test_version_1_online_report_counts_the_mirrors_on_the_wire() -> None:
    v1 = {**V1_LIVE, "mode": "online", "bytes_transferred": 100,
          "disks": [{"source": "/a", "format": "raw", "virtual_size": 1000,
                     "source_allocated": 300, "target": "/b", "target_format": "qcow2",
                     "bytes": 1000, "ready_s": 2.0, "handover_s": 0.1, "mirror_mbps": 1.2}]}
    r = load_report(v1)
    assert r.bytes_transferred == 100 + 1000 and r.memory and r.memory.bytes == 100
    (d,) = r.disks
    assert (d.data_bytes, d.ready_s, d.handover_s, d.verified) == (300, 2.0, 0.1, "mirror")


def test_version_2_round_trip_and_unknown_versions() -> None:
    r = MigrationReport(job="j", vm="v", mode="online", source="a", dest="b",
                        memory=MemoryFigures(qemu_downtime_ms=20),
                        disks=[DiskFigures(source="/a", format="raw", virtual_size=1,
                                           source_allocated=1, target="/b",
                                           target_format="raw")])
    r.add_check(Check(name="ping", ok=True))
    r.add_check(Check(name="ping", ok=False, detail="silent"))  # a later verdict wins
    again = load_report(r.model_dump(mode="json"))
    assert again == r and [c.ok for c in again.checks] == [False]
    assert again.downtime_ms == 20.0  # no probe: QEMU's figure
    with pytest.raises(StoreError):
        load_report({**r.model_dump(mode="json"), "v": 3})
    with pytest.raises(StoreError):
        load_report({"v": 2, "job": "j"})  # not a report
