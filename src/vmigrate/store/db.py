"""The SQLite store: VM definitions now, migration jobs later.

The database starts with a ``meta`` row holding a magic string and a schema
version; a database of an unknown version is refused (:class:`StoreError`)
rather than guessed at. Every write is its own transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmigrate.errors import NotFoundError, StateError, StoreError

MAGIC = "vmigrate-store"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class VmRecord:
    """A VM vmigrate manages: its spec (JSON, validated by the caller) and its host."""

    name: str
    host: str
    spec_json: str
    created_at: float


class Store:
    """The controller's database at ``path`` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._init()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc

    def _init(self) -> None:
        self._db.executescript(_SCHEMA)
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            self._db.execute("INSERT INTO meta VALUES ('magic', ?), ('version', ?)",
                             (MAGIC, str(SCHEMA_VERSION)))
            return
        if rows.get("magic") != MAGIC:
            raise StoreError(f"{self.path} is not a vmigrate state database")
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
                raise StateError(f"a VM named {name!r} already exists")
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

    def remove_vm(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE name=?", (name,))

    @staticmethod
    def _record(row: tuple[str, str, str, float]) -> VmRecord:
        return VmRecord(*row)
