"""The store side of planning: calibration history, track record, reused assessments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmigrate.config import Inventory
from vmigrate.errors import UserError
from vmigrate.plan.assessment import Assessment, DirtyWindow, LinkAssessment
from vmigrate.plan.capabilities import MigrationOptions
from vmigrate.plan.policy import BUILTIN
from vmigrate.service.planning import (
    MODEL_VERSION,
    history,
    latest_assessment,
    make_plan,
    prediction_record,
    track_record,
)
from vmigrate.store import Store

MiB = 1 << 20


def _report(mode: str, total: float, *, model: int = MODEL_VERSION) -> dict[str, Any]:
    # a stored report (version 1: no "v"), as whole as the store keeps them
    return {"job": "j", "vm": "vm1", "source": "h1", "dest": "h2",
            "mode": mode, "total_time_s": total, "observed_downtime_ms": 100.0,
            "bytes_transferred": 50 * MiB, "disks": [],
            "prediction": {"model": model, "raw": {"total_time_s": 10.0, "downtime_ms": 50.0,
                                                   "wire_bytes": 40 * MiB}}}


def _job(store: Store, jid: str, mode: str, status: str, report: dict[str, Any] | None) -> None:
    store.create_job(jid, "vm1", mode, "h1", "h2", {})
    store.end_job(jid, status, report=report)


def test_history_takes_finished_jobs_with_a_current_prediction(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    _job(store, "a", "live", "completed", _report("live", 20.0))
    _job(store, "b", "live", "failed", _report("live", 20.0))  # nothing measured
    _job(store, "c", "live", "completed", _report("live", 20.0, model=0))  # older model
    _job(store, "d", "live", "completed", {**_report("live", 20.0), "prediction": None})
    _job(store, "e", "cold", "completed", _report("cold", 30.0))
    got = history(store)
    assert [(e.mode, e.measured.total_time_s, e.raw.total_time_s) for e in got] == [
        ("live", 20.0, 10.0), ("cold", 30.0, 10.0)]
    assert got[0].measured.wire_bytes == 50 * MiB
    assert track_record(store) == {"live": (3, 4), "cold": (1, 1)}


def _assessment(at: float, link: bool = True) -> Assessment:
    return Assessment(
        vm="vm1", host="h1", at=at, memory_bytes=256 * MiB, qemu_version=(7, 2, 0),
        dirty=(DirtyWindow(seconds=1, rate=MiB),), tls=True,
        link=LinkAssessment(source="h1", dest="h2", bandwidth=25e6) if link else None)


def test_latest_assessment_is_young_and_has_a_link(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    for at, link in ((1000.0, True), (1500.0, True), (1600.0, False)):
        a = _assessment(at, link)
        store.add_assessment("vm1", "h1", "h2", at, a.model_dump(mode="json"))
    got = latest_assessment(store, "vm1", "h2", max_age=600, now=1700.0)
    assert got is not None and got.at == 1500.0  # the newest one has no link
    assert latest_assessment(store, "vm1", "h2", max_age=100, now=1700.0) is None
    assert latest_assessment(store, "vm1", "h3", max_age=6000, now=1700.0) is None


def test_plan_and_prediction_record(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    plan = make_plan(Inventory(), store, _assessment(1000.0),
                     MigrationOptions(policy=BUILTIN["balanced"]))
    # no disks, not shared: every disk mode is possible, live is too (nothing to share)
    assert plan.decision.chosen is not None
    rec = prediction_record(plan, "live", chosen_by="auto")
    assert rec["model"] == MODEL_VERSION and rec["mode"] == "live"
    assert rec["raw"]["wire_bytes"] > 0 and rec["explanation"]
    assert prediction_record(plan, "live", chosen_by="operator")["explanation"] == []
    stopped = _assessment(1000.0).model_copy(update={"running": False})
    plan = make_plan(Inventory(), store, stopped, MigrationOptions(policy=BUILTIN["balanced"]))
    with pytest.raises(UserError):
        prediction_record(plan, "live", chosen_by="auto")


def test_window_advice_from_stored_history(tmp_path: Path) -> None:
    from vmigrate.cli.plan import window_advice

    store = Store(tmp_path / "db")
    opts = MigrationOptions(policy=BUILTIN["balanced"])
    advice, what = window_advice(store, "vm1", None, opts)
    assert advice.best is None and advice.message  # no history: said, not raised
    day = 86400.0 * 1000
    for hour, rate in ((2, 1.0), (2, 1.5), (14, 40.0), (14, 45.0)):
        for k in range(2):
            a = _assessment(day + hour * 3600 + k * 60).model_copy(
                update={"dirty": (DirtyWindow(seconds=1, rate=rate * MiB),)})
            store.add_assessment("vm1", "h1", "h2", a.at, a.model_dump(mode="json"))
    advice, what = window_advice(store, "vm1", "h2", opts)
    assert "predicted" in what
    assert advice.best is not None
    # the quiet hour wins whatever the local time zone: compare dirty rates, not hours
    assert advice.best.dirty_median < 2 * MiB
    assert advice.runner_up is not None and advice.runner_up.dirty_median > 30 * MiB
