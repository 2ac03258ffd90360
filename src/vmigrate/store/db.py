"""The SQLite store: VM definitions, migration jobs, assessments, host states.

The database starts with a ``meta`` row holding a magic string and a schema
version; a database of an unknown version is refused (:class:`StoreError`)
rather than guessed at. Every write is its own transaction.

Version 6 added the host states an operator sets at run time (``host_states``); version 7
the waves of migrations the fleet orchestrator runs (``waves``, ``wave_moves``: see
:mod:`vmigrate.fleet`). An older store is upgraded in place when opened (tables and
columns are only ever added); a vmigrate that knows an older version refuses a newer
store.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vmigrate import validate
from vmigrate.errors import ConflictError, NotFoundError, StoreError, UserError

MAGIC = "vmigrate-store"
SCHEMA_VERSION = 7
#: versions this code upgrades in place (each only adds tables or columns)
_UPGRADABLE = {"1", "2", "3", "4", "5", "6"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    mode TEXT NOT NULL,
    source TEXT NOT NULL,
    dest TEXT NOT NULL,
    phase TEXT NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    report TEXT,
    error TEXT,
    controller_pid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT,
    audit_head TEXT
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm, status);
CREATE TABLE IF NOT EXISTS assessments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    host TEXT NOT NULL,
    dest TEXT,
    at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assessments_vm ON assessments (vm, at);
CREATE TABLE IF NOT EXISTS host_states (
    host TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS waves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    host TEXT,
    state TEXT NOT NULL,
    plan TEXT NOT NULL,
    options TEXT NOT NULL,
    eta_s REAL,
    controller_pid INTEGER,
    started REAL,
    ended REAL,
    report TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS wave_moves (
    wave INTEGER NOT NULL REFERENCES waves (id),
    vm TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    mode TEXT NOT NULL,
    ord INTEGER NOT NULL,
    plan_start_s REAL NOT NULL,
    plan_end_s REAL NOT NULL,
    bandwidth INTEGER NOT NULL,
    state TEXT NOT NULL,
    job TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started REAL,
    ended REAL,
    predicted_time_s REAL,
    predicted_downtime_ms REAL,
    predicted_bytes INTEGER,
    time_s REAL,
    downtime_ms REAL,
    bytes INTEGER,
    PRIMARY KEY (wave, vm)
);
"""

#: job statuses; RUNNING is active (a controller drives it); RUNNING and
#: NEEDS_OPERATOR lock the VM (no other job may start for it)
RUNNING = "running"
NEEDS_OPERATOR = "needs-operator"
JOB_STATUSES = (RUNNING, "completed", "failed", "cancelled", NEEDS_OPERATOR)
LOCKING = (RUNNING, NEEDS_OPERATOR)


@dataclass(frozen=True)
class JobRecord:
    """A migration job: which VM goes where, how far it got, what it reported."""

    id: str
    vm: str
    mode: str
    source: str
    dest: str
    phase: str
    status: str
    options: dict[str, Any]
    report: dict[str, Any] | None
    error: str | None
    controller_pid: int | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    #: the engine's typed state (``vmigrate.migration.state.JobState`` as JSON), None
    #: for jobs of older versions
    state: str | None = None

    @property
    def active(self) -> bool:
        """A controller drives the job (or did, until it died)."""
        return self.status == RUNNING

    @property
    def locks_vm(self) -> bool:
        """No other job may start for the VM: running, or waiting for an operator."""
        return self.status in LOCKING


_JOB_COLS = (
    "id, vm, mode, source, dest, phase, status, options, report, error, controller_pid, "
    "cancel_requested, created_at, updated_at, state"
)


@dataclass(frozen=True)
class VmRecord:
    """A VM vmigrate manages: its spec (JSON, validated by the caller) and its host."""

    name: str
    host: str
    spec_json: str
    created_at: float


#: the states a host can be in (the inventory's ``state`` field takes the same)
HOST_STATES = ("active", "draining", "maintenance")
#: the longest reason kept with a host state
MAX_REASON = 500


@dataclass(frozen=True)
class HostStateRecord:
    """A host's state: set at run time by an operator (``source`` "store"), or the
    inventory's declared one (``source`` "inventory", ``since`` None)."""

    host: str
    state: str
    #: when the operator set it (seconds since the epoch); None for the inventory's
    since: float | None
    reason: str
    source: Literal["store", "inventory"] = "store"

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "state": self.state, "since": self.since,
                "reason": self.reason, "source": self.source}


#: SQLite's companions of the database file (WAL mode)
_COMPANIONS = ("-wal", "-shm", "-journal")


def _private(path: Path) -> None:
    """The database's directory (0700 when we create it) and the file itself, created
    0600 before SQLite opens it; SQLite gives its ``-wal`` and ``-shm`` files the
    database's mode."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def _tighten(path: Path) -> None:
    """Take group and other access away from the database and its companions (a store
    created by an older vmigrate was world-readable). Files of another owner are
    left alone."""
    for p in (path, *(path.with_name(path.name + c) for c in _COMPANIONS)):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            st = p.stat()
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                p.chmod(stat.S_IMODE(st.st_mode) & 0o700)


#: the states of a wave and of one of its moves (see :mod:`vmigrate.fleet`)
WAVE_KINDS = ("plan", "evacuate", "rebalance")
WAVE_STATES = ("planned", "running", "done", "failed", "cancelled")
MOVE_STATES = ("pending", "running", "done", "failed", "skipped")


@dataclass(frozen=True)
class WaveRecord:
    """A wave of migrations: its plan (a schedule as JSON, and its moves) and its state."""

    id: int
    created: float
    kind: str
    #: the host an evacuation empties (None for other kinds)
    host: str | None
    state: str
    #: ``{"schedule": Schedule.to_json(), ...}`` as given to :meth:`Store.create_wave`
    plan: dict[str, Any]
    #: the :class:`~vmigrate.service.migrations.MigrationRequest` fields every move shares
    options: dict[str, Any]
    #: the wave's ETA in seconds: predicted at planning, updated from what is measured
    eta_s: float | None
    #: the process that runs (or last ran) the wave
    controller_pid: int | None
    started: float | None
    ended: float | None
    report: dict[str, Any] | None


@dataclass(frozen=True)
class WaveMoveSpec:
    """One move of a new wave, as planned."""

    vm: str
    src: str
    dst: str
    mode: str
    #: its start and end in the schedule (seconds from the wave's start)
    plan_start_s: float
    plan_end_s: float
    #: the bandwidth cap it runs with (bytes/s)
    bandwidth: int
    predicted_time_s: float | None = None
    predicted_downtime_ms: float | None = None
    predicted_bytes: int | None = None


@dataclass(frozen=True)
class WaveMoveRecord:
    """One move of a wave: the plan's figures, its state, its job and what it measured."""

    wave: int
    vm: str
    src: str
    dst: str
    mode: str
    #: its place in the schedule's start order (0 first)
    order: int
    plan_start_s: float
    plan_end_s: float
    bandwidth: int
    state: str
    #: the migration job of its last attempt (None until that job exists)
    job: str | None
    attempts: int
    error: str | None
    started: float | None
    ended: float | None
    predicted_time_s: float | None
    predicted_downtime_ms: float | None
    predicted_bytes: int | None
    time_s: float | None
    downtime_ms: float | None
    bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


_WAVE_COLS = ("id, created, kind, host, state, plan, options, eta_s, controller_pid, started, "
              "ended, report")
_MOVE_COLS = ("wave, vm, src, dst, mode, ord, plan_start_s, plan_end_s, bandwidth, state, job, "
              "attempts, error, started, ended, predicted_time_s, predicted_downtime_ms, "
              "predicted_bytes, time_s, downtime_ms, bytes")


class Store:
    """The controller's database at ``path`` (created on first use, 0600, in a
    directory created 0700)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            _private(path)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._init()
            _tighten(path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot create the state database {path}: {exc}") from exc

    def _init(self) -> None:
        self._db.executescript(_SCHEMA)
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            self._db.execute("INSERT INTO meta VALUES ('magic', ?), ('version', ?)",
                             (MAGIC, str(SCHEMA_VERSION)))
            return
        if rows.get("magic") != MAGIC:
            raise StoreError(f"{self.path} is not a vmigrate state database")
        if rows.get("version") in _UPGRADABLE:
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
            if "state" not in cols:  # version 4 added the engine's typed job state
                self._db.execute("ALTER TABLE jobs ADD COLUMN state TEXT")
            if "audit_head" not in cols:  # version 5: the audit log's head after the job
                self._db.execute("ALTER TABLE jobs ADD COLUMN audit_head TEXT")
            self._db.execute("UPDATE meta SET value=? WHERE key='version'", (str(SCHEMA_VERSION),))
            return
        if rows.get("version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has schema version {rows.get('version')}, this vmigrate knows "
                f"{SCHEMA_VERSION}"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    # -- VMs ---------------------------------------------------------------------------

    def add_vm(self, name: str, host: str, spec_json: str) -> VmRecord:
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM vms WHERE name=?", (name,)).fetchone():
                raise ConflictError(f"a VM named {name!r} already exists")
            db.execute("INSERT INTO vms VALUES (?, ?, ?, ?, ?)", (name, host, spec_json, now, now))
        return VmRecord(name, host, spec_json, now)

    def get_vm(self, name: str) -> VmRecord:
        row = self._db.execute(
            "SELECT name, host, spec, created_at FROM vms WHERE name=?", (name,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no VM named {name!r} (see 'vmigrate vm list')")
        return self._record(row)

    def list_vms(self) -> list[VmRecord]:
        rows = self._db.execute(
            "SELECT name, host, spec, created_at FROM vms ORDER BY name"
        ).fetchall()
        return [self._record(r) for r in rows]

    def set_vm_host(self, name: str, host: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE vms SET host=?, updated_at=? WHERE name=?", (host, time.time(), name)
            )

    def move_vm(self, name: str, host: str, spec_json: str) -> None:
        """The VM now runs on ``host`` with ``spec_json`` (its disks moved too): both
        change in one transaction."""
        with self._tx() as db:
            db.execute("UPDATE vms SET host=?, spec=?, updated_at=? WHERE name=?",
                       (host, spec_json, time.time(), name))

    def remove_vm(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE name=?", (name,))

    @staticmethod
    def _record(row: tuple[str, str, str, float]) -> VmRecord:
        return VmRecord(*row)

    # -- jobs --------------------------------------------------------------------------

    def create_job(
        self, job_id: str, vm: str, mode: str, source: str, dest: str, options: dict[str, Any],
        *, pid: int | None = None, state: str | None = None,
    ) -> JobRecord:
        """Record a new running job in phase ``begin``. The VM is locked: while another
        job for it runs or waits for an operator, :class:`ConflictError` is raised
        and nothing is written."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"SELECT id, status FROM jobs WHERE vm=? AND status IN "
                f"({','.join('?' * len(LOCKING))})", (vm, *LOCKING)).fetchone()
            if row:
                how = ("runs" if row[1] == RUNNING else "waits for an operator")
                raise ConflictError(
                    f"VM {vm!r} is locked: job {row[0]} {how} (see 'vmigrate job show "
                    f"{row[0]}'; 'vmigrate job recover' settles a job whose controller died "
                    "or that waits for an operator)"
                )
            db.execute(
                f"INSERT INTO jobs ({_JOB_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, vm, mode, source, dest, "begin", RUNNING, json.dumps(options), None,
                 None, pid, 0, now, now, state),
            )
        return self.get_job(job_id)

    def set_phase(self, job_id: str, phase: str) -> None:
        """Write-ahead: called before the phase's first side effect."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET phase=?, updated_at=? WHERE id=?",
                       (phase, time.time(), job_id))

    def save_state(self, job_id: str, phase: str, state: str) -> None:
        """Write-ahead: the job's typed state (JSON) and phase, in one transaction,
        before the side effect they announce."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET phase=?, state=?, updated_at=? WHERE id=?",
                       (phase, state, time.time(), job_id))

    def reopen_job(self, job_id: str, pid: int | None) -> None:
        """A job waiting for an operator is driven again (``job recover``): running,
        by controller ``pid``."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status=?, controller_pid=?, updated_at=? WHERE id=? "
                       "AND status=?", (RUNNING, pid, time.time(), job_id, NEEDS_OPERATOR))

    def set_controller(self, job_id: str, pid: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET controller_pid=?, updated_at=? WHERE id=?",
                       (pid, time.time(), job_id))

    def end_job(self, job_id: str, status: str, *, report: dict[str, Any] | None = None,
                error: str | None = None, phase: str | None = None) -> None:
        if status not in JOB_STATUSES or status == RUNNING:
            raise ValueError(f"not a final job status: {status}")
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status=?, report=?, error=?, phase=COALESCE(?, phase), "
                "updated_at=? WHERE id=?",
                (status, json.dumps(report) if report is not None else None, error, phase,
                 time.time(), job_id),
            )

    def set_audit_head(self, job_id: str, seq: int, digest: str) -> None:
        """Keep the audit log's head after the job: the seq and line hash of its last
        record (``vmigrate audit verify`` checks the log against it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET audit_head=?, updated_at=? WHERE id=?",
                       (json.dumps({"seq": seq, "hash": digest}), time.time(), job_id))

    def audit_heads(self) -> dict[str, tuple[int, str]]:
        """Every job's audit head (job id -> (seq, line hash)), for jobs that have one.
        Raises :class:`StoreError` naming a job whose stored head is not one."""
        heads: dict[str, tuple[int, str]] = {}
        try:
            rows = self._db.execute(
                "SELECT id, audit_head FROM jobs WHERE audit_head IS NOT NULL").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {exc}") from exc
        for job_id, text in rows:
            try:
                head = json.loads(text)
                seq, digest = head["seq"], head["hash"]
            except (ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"job {job_id}: the stored audit head is not one") from exc
            if (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1
                    or not isinstance(digest, str) or len(digest) != 64):
                raise StoreError(f"job {job_id}: the stored audit head is not one")
            heads[job_id] = (seq, digest)
        return heads

    def save_report(self, job_id: str, report: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET report=?, updated_at=? WHERE id=?",
                       (json.dumps(report), time.time(), job_id))

    def request_cancel(self, job_id: str) -> JobRecord:
        job = self.get_job(job_id)
        if not job.active:
            raise ConflictError(f"job {job_id} is not running (status {job.status})")
        with self._tx() as db:
            db.execute("UPDATE jobs SET cancel_requested=1, updated_at=? WHERE id=?",
                       (time.time(), job.id))
        return self.get_job(job.id)

    def get_job(self, job_id: str) -> JobRecord:
        """The job ``job_id``, or the only one whose id starts with it (the prefix is
        matched literally: ``%`` and ``_`` are characters). :class:`NotFoundError`
        when none matches, :class:`UserError` naming the candidates when several
        do."""
        if not job_id:
            raise UserError("an empty job id names no job (see 'vmigrate job list')")
        exact = self.find_job(job_id)
        if exact is not None:
            return exact
        rows = self._db.execute(
            f"SELECT {_JOB_COLS} FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created_at",
            (len(job_id), job_id),
        ).fetchall()
        if not rows:
            raise NotFoundError(f"no job {job_id!r} (see 'vmigrate job list')")
        if len(rows) > 1:
            shown = ", ".join(r[0] for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            raise UserError(f"job id prefix {job_id!r} is ambiguous: {len(rows)} jobs match "
                            f"({shown})")
        return self._job(rows[0])

    def find_job(self, job_id: str) -> JobRecord | None:
        """The job whose id is exactly ``job_id``, or None."""
        row = self._db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?",
                               (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def locking_job(self, vm: str) -> JobRecord | None:
        """The job that locks ``vm`` (running, or waiting for an operator), or None."""
        row = self._db.execute(
            f"SELECT {_JOB_COLS} FROM jobs WHERE vm=? AND status IN "
            f"({','.join('?' * len(LOCKING))}) ORDER BY created_at", (vm, *LOCKING)
        ).fetchone()
        return self._job(row) if row is not None else None

    def discard_job(self, job_id: str) -> None:
        """Forget a job refused before its first side effect (still running in phase
        ``begin`` with no saved progress beyond it): the VM is unlocked as if it had
        never been asked for. Any other job is left as it is."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id=? AND status=? AND phase='begin'",
                       (job_id, RUNNING))

    def list_jobs(self, *, vm: str | None = None, active: bool | None = None) -> list[JobRecord]:
        sql = f"SELECT {_JOB_COLS} FROM jobs"
        where, args = [], []
        if vm is not None:
            where.append("vm=?")
            args.append(vm)
        if active is not None:
            where.append("status=?" if active else "status<>?")
            args.append(RUNNING)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        return [self._job(r) for r in rows]

    @staticmethod
    def _job(row: tuple[Any, ...]) -> JobRecord:
        (jid, vm, mode, source, dest, phase, status, options, report, error, pid, cancel,
         created, updated, state) = row
        return JobRecord(
            jid, vm, mode, source, dest, phase, status, json.loads(options),
            json.loads(report) if report else None, error, pid, bool(cancel), created, updated,
            state,
        )

    # -- host states -------------------------------------------------------------------

    def set_host_state(self, host: str, state: str, reason: str = "", *,
                       since: float | None = None) -> HostStateRecord:
        """Keep ``state`` as host ``host``'s state, overriding the inventory's declared
        one (``vmigrate host maintenance`` / ``host activate``), with when (``since``,
        default now) and why. Replaces an earlier one. :class:`UserError` for a state
        that is not one of :data:`HOST_STATES`, a host that is not a name or a reason
        that is not printable text of at most 500 characters; nothing is written then.
        Whether the host is in the inventory is the caller's to check."""
        if state not in HOST_STATES:
            raise UserError(f"not a host state: {str(state)[:40]!r} (one of "
                            f"{', '.join(HOST_STATES)})")
        try:
            validate.check_name(host, "host name")
            validate.check_text(reason, "a reason", limit=MAX_REASON)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        at = time.time() if since is None else since
        with self._tx() as db:
            db.execute("INSERT INTO host_states (host, state, since, reason) VALUES "
                       "(?, ?, ?, ?) ON CONFLICT (host) DO UPDATE SET state=excluded.state, "
                       "since=excluded.since, reason=excluded.reason",
                       (host, state, at, reason))
        return HostStateRecord(host, state, at, reason)

    def clear_host_state(self, host: str) -> bool:
        """Forget the state set at run time for ``host``: the inventory's applies again.
        Whether there was one."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM host_states WHERE host=?", (host,))
        return cur.rowcount > 0

    def get_host_state(self, host: str) -> HostStateRecord | None:
        """The state set at run time for ``host``, or None (the inventory's applies)."""
        row = self._db.execute("SELECT host, state, since, reason FROM host_states "
                               "WHERE host=?", (host,)).fetchone()
        return None if row is None else self._host_state(row)

    def list_host_states(self) -> dict[str, HostStateRecord]:
        """Every state set at run time, by host."""
        rows = self._db.execute(
            "SELECT host, state, since, reason FROM host_states ORDER BY host").fetchall()
        return {r[0]: self._host_state(r) for r in rows}

    def effective_host_state(self, host: str, declared: str) -> HostStateRecord:
        """Host ``host``'s state: the one set at run time, else ``declared`` (the
        inventory's, :meth:`vmigrate.config.Inventory.declared_state`)."""
        stored = self.get_host_state(host)
        if stored is not None:
            return stored
        return HostStateRecord(host, declared, None, "", source="inventory")

    def _host_state(self, row: tuple[Any, ...]) -> HostStateRecord:
        host, state, since, reason = row
        if state not in HOST_STATES:
            raise StoreError(f"{self.path}: host {host}: stored state {str(state)[:40]!r} "
                             "is not one")
        return HostStateRecord(host, state, float(since), reason)

    # -- assessments -------------------------------------------------------------------

    def add_assessment(self, vm: str, host: str, dest: str | None, at: float,
                       data: dict[str, Any]) -> int:
        """Keep one assessment (JSON, validated by the caller); history accumulates."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO assessments (vm, host, dest, at, data) "
                             "VALUES (?, ?, ?, ?, ?)", (vm, host, dest, at, json.dumps(data)))
        return int(cur.lastrowid or 0)

    def list_assessments(self, vm: str | None = None, *, dest: str | None = None,
                         since: float | None = None) -> list[dict[str, Any]]:
        """Stored assessments, oldest first (their JSON)."""
        sql = "SELECT data FROM assessments"
        where: list[str] = []
        args: list[str | float] = []
        if vm is not None:
            where.append("vm=?")
            args.append(vm)
        if dest is not None:
            where.append("dest=?")
            args.append(dest)
        if since is not None:
            where.append("at>=?")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY at, id", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- waves -------------------------------------------------------------------------

    def create_wave(self, kind: str, plan: dict[str, Any], moves: list[WaveMoveSpec], *,
                    host: str | None = None, eta_s: float | None = None,
                    options: dict[str, Any] | None = None) -> WaveRecord:
        """Keep a new wave in state ``planned`` with its moves ``pending``, in the order
        given (the schedule's start order), in one transaction. :class:`UserError` for
        an unknown kind, no moves or a VM named twice; nothing is written then."""
        if kind not in WAVE_KINDS:
            raise UserError(f"not a wave kind: {kind!r} (one of {', '.join(WAVE_KINDS)})")
        if not moves:
            raise UserError("a wave needs at least one move")
        if len({m.vm for m in moves}) != len(moves):
            raise UserError("a wave moves each VM once")
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO waves (created, kind, host, state, plan, options, eta_s, updated) "
                "VALUES (?, ?, ?, 'planned', ?, ?, ?, ?)",
                (now, kind, host, json.dumps(plan), json.dumps(options or {}), eta_s, now))
            wave = int(cur.lastrowid or 0)
            for order, m in enumerate(moves):
                db.execute(
                    f"INSERT INTO wave_moves ({_MOVE_COLS}) VALUES "
                    f"({','.join('?' * 21)})",
                    (wave, m.vm, m.src, m.dst, m.mode, order, m.plan_start_s, m.plan_end_s,
                     int(m.bandwidth), "pending", None, 0, None, None, None,
                     m.predicted_time_s, m.predicted_downtime_ms, m.predicted_bytes, None,
                     None, None))
        return self.get_wave(wave)

    def get_wave(self, wave: int) -> WaveRecord:
        row = self._db.execute(f"SELECT {_WAVE_COLS} FROM waves WHERE id=?",
                               (wave,)).fetchone()
        if row is None:
            raise NotFoundError(f"no wave {wave} (see 'vmigrate wave list')")
        return self._wave(row)

    def list_waves(self) -> list[WaveRecord]:
        rows = self._db.execute(f"SELECT {_WAVE_COLS} FROM waves ORDER BY id").fetchall()
        return [self._wave(r) for r in rows]

    def wave_moves(self, wave: int) -> list[WaveMoveRecord]:
        """The wave's moves in the schedule's start order."""
        rows = self._db.execute(f"SELECT {_MOVE_COLS} FROM wave_moves WHERE wave=? ORDER BY ord",
                                (wave,)).fetchall()
        return [WaveMoveRecord(*r) for r in rows]

    def wave_move(self, wave: int, vm: str) -> WaveMoveRecord:
        row = self._db.execute(f"SELECT {_MOVE_COLS} FROM wave_moves WHERE wave=? AND vm=?",
                               (wave, vm)).fetchone()
        if row is None:
            raise NotFoundError(f"wave {wave} does not move {vm!r}")
        return WaveMoveRecord(*row)

    def set_wave_state(self, wave: int, state: str, *, pid: int | None = None,
                       eta_s: float | None = None, report: dict[str, Any] | None = None
                       ) -> None:
        """The wave's state (``running`` also sets ``started`` once and the controller's
        ``pid``; an end state sets ``ended``); ``eta_s`` and ``report`` when given."""
        if state not in WAVE_STATES:
            raise ValueError(f"not a wave state: {state}")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE waves SET state=?, controller_pid=COALESCE(?, controller_pid), "
                "started=CASE WHEN ?='running' THEN COALESCE(started, ?) ELSE started END, "
                "ended=CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN ? ELSE NULL END, "
                "eta_s=COALESCE(?, eta_s), report=COALESCE(?, report), updated=? WHERE id=?",
                (state, pid, state, now, state, now, eta_s,
                 json.dumps(report) if report is not None else None, now, wave))

    def claim_wave(self, wave: int, pid: int, *, state: str, controller_pid: int | None
                   ) -> bool:
        """Take the wave to run it (``running``, by ``pid``), if it is still in ``state``
        run by ``controller_pid`` (compare and swap: of two controllers that try at
        once, one gets it). False (nothing written) otherwise."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE waves SET state='running', controller_pid=?, "
                "started=COALESCE(started, ?), ended=NULL, updated=? "
                "WHERE id=? AND state=? AND controller_pid IS ?",
                (pid, now, now, wave, state, controller_pid))
        return cur.rowcount == 1

    def set_wave_eta(self, wave: int, eta_s: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE waves SET eta_s=?, updated=? WHERE id=?",
                       (eta_s, time.time(), wave))

    def claim_move(self, wave: int, vm: str) -> bool:
        """Write-ahead, before a migration of the move starts: ``pending`` -> ``running``,
        one more attempt, no job yet, ``started`` now. False (nothing written) when the
        move was not pending."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE wave_moves SET state='running', attempts=attempts+1, job=NULL, "
                "error=NULL, started=?, ended=NULL WHERE wave=? AND vm=? AND state='pending'",
                (time.time(), wave, vm))
        return cur.rowcount == 1

    def set_move_job(self, wave: int, vm: str, job: str) -> None:
        """The job of the move's running attempt (called as soon as the job exists)."""
        with self._tx() as db:
            db.execute("UPDATE wave_moves SET job=? WHERE wave=? AND vm=? AND state='running'",
                       (job, wave, vm))

    def end_move(self, wave: int, vm: str, state: str, *, error: str | None = None,
                 job: str | None = None, time_s: float | None = None,
                 downtime_ms: float | None = None, bytes_moved: int | None = None) -> None:
        """The move's state after an attempt: ``pending`` again (to retry it), or an end
        state (``ended`` now); the error and measured figures when given (kept
        otherwise)."""
        if state not in MOVE_STATES or state == "running":
            raise ValueError(f"not a state a move ends an attempt in: {state}")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE wave_moves SET state=?, error=?, job=COALESCE(?, job), "
                "ended=CASE WHEN ?='pending' THEN NULL ELSE ? END, "
                "time_s=COALESCE(?, time_s), downtime_ms=COALESCE(?, downtime_ms), "
                "bytes=COALESCE(?, bytes) WHERE wave=? AND vm=?",
                (state, error, job, state, now, time_s, downtime_ms, bytes_moved, wave, vm))

    def note_move(self, wave: int, vm: str, error: str) -> None:
        """Keep why a move waits (e.g. its job needs an operator); its state stays."""
        with self._tx() as db:
            db.execute("UPDATE wave_moves SET error=? WHERE wave=? AND vm=?",
                       (error, wave, vm))

    def retry_failed_moves(self, wave: int) -> list[str]:
        """``failed`` moves -> ``pending`` with their attempts reset (a wave resumed
        after an operator fixed what failed); the VMs."""
        with self._tx() as db:
            rows = db.execute("SELECT vm FROM wave_moves WHERE wave=? AND state='failed' "
                              "ORDER BY ord", (wave,)).fetchall()
            db.execute("UPDATE wave_moves SET state='pending', attempts=0, ended=NULL "
                       "WHERE wave=? AND state='failed'", (wave,))
        return [r[0] for r in rows]

    @staticmethod
    def _wave(row: tuple[Any, ...]) -> WaveRecord:
        (wid, created, kind, host, state, plan, options, eta, pid, started, ended,
         report) = row
        return WaveRecord(int(wid), created, kind, host, state, json.loads(plan),
                          json.loads(options), eta, pid, started, ended,
                          json.loads(report) if report else None)
