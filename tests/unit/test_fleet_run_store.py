"""The store's waves (schema 7): kept, claimed write-ahead, upgraded from version 6."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vmigrate.errors import NotFoundError, UserError
from vmigrate.fleet import wave_eta, wave_report
from vmigrate.store import Store, WaveMoveSpec


def spec(vm: str, start: float = 0.0, end: float = 10.0) -> WaveMoveSpec:
    return WaveMoveSpec(vm=vm, src="h1", dst="h2", mode="live", plan_start_s=start,
                        plan_end_s=end, bandwidth=50_000_000, predicted_time_s=end - start,
                        predicted_downtime_ms=20.0, predicted_bytes=1 << 30)


def test_a_wave_and_its_moves_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with pytest.raises(UserError):
        store.create_wave("plan", {}, [])
    with pytest.raises(UserError):
        store.create_wave("bogus", {}, [spec("a")])
    with pytest.raises(UserError):
        store.create_wave("plan", {}, [spec("a"), spec("a")])
    wave = store.create_wave("evacuate", {"schedule": {"makespan_s": 20.0}},
                             [spec("b", 0, 10), spec("a", 10, 20)], host="h1", eta_s=20.0,
                             options={"policy": "balanced"})
    assert (wave.state, wave.kind, wave.host, wave.eta_s) == ("planned", "evacuate", "h1", 20.0)
    assert [(m.vm, m.order, m.state, m.attempts) for m in store.wave_moves(wave.id)] == [
        ("b", 0, "pending", 0), ("a", 1, "pending", 0)]
    assert wave_eta(store.wave_moves(wave.id)) == 20.0
    # the write-ahead claim: once, only from pending
    assert store.claim_move(wave.id, "b")
    assert not store.claim_move(wave.id, "b")
    store.set_move_job(wave.id, "b", "job1")
    m = store.wave_move(wave.id, "b")
    assert (m.state, m.job, m.attempts) == ("running", "job1", 1) and m.started is not None
    store.end_move(wave.id, "b", "done", time_s=20.0, downtime_ms=30.0, bytes_moved=5)
    m = store.wave_move(wave.id, "b")
    assert (m.state, m.time_s, m.bytes) == ("done", 20.0, 5) and m.ended is not None
    assert wave_eta(store.wave_moves(wave.id)) == pytest.approx(20.0)  # measured 2x
    store.claim_move(wave.id, "a")
    store.end_move(wave.id, "a", "failed", error="boom")
    assert store.retry_failed_moves(wave.id) == ["a"]
    assert store.wave_move(wave.id, "a").attempts == 0
    store.set_wave_state(wave.id, "running", pid=123)
    store.set_wave_state(wave.id, "failed", report={"x": 1})
    got = store.get_wave(wave.id)
    assert got.state == "failed" and got.report == {"x": 1} and got.controller_pid == 123
    assert got.started is not None and got.ended is not None
    report = wave_report(got, store.wave_moves(wave.id))
    assert report["done"] == ["b"] and report["moves"][0]["measured"]["bytes"] == 5
    with pytest.raises(NotFoundError):
        store.get_wave(99)
    store.close()
    assert [w.id for w in Store(tmp_path / "db").list_waves()] == [wave.id]


def test_a_version_6_store_is_upgraded(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_vm("vm", "h1", "{}")
    store.close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("DROP TABLE wave_moves")
    db.execute("DROP TABLE waves")
    db.execute("UPDATE meta SET value='6' WHERE key='version'")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    assert [v.name for v in store.list_vms()] == ["vm"]
    assert store.create_wave("plan", {}, [spec("vm")]).id == 1
    store.close()
    db = sqlite3.connect(tmp_path / "db")
    assert db.execute("SELECT value FROM meta WHERE key='version'").fetchone() == ("7",)
    db.close()
