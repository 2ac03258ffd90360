"""Audit witnesses on the hosts: written after each job, read back by ``audit verify``.

The format is :mod:`vmigrate.audit.witness`; this module moves it through the host layer,
with argv-only commands (``mkdir``, ``cat``, ``find``, and :meth:`Host.write_file`, which
replaces a file atomically). Nothing here decides a migration: a witness that cannot be
written is noted in the job's report and the job's outcome stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from vmigrate.audit.log import Claim
from vmigrate.audit.witness import Witness, witness_dir, witness_path
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import HostUnreachableError, StoreError, VmigrateError
from vmigrate.hosts import Host, open_host
from vmigrate.store import Store

#: how the service reaches a host to keep a witness there (the default opens the
#: inventory's transport: SSH, or local)
HostOpener = Callable[[HostConfig], Host]

#: seconds one host may take to list its witnesses (``audit verify``)
DEFAULT_TIMEOUT_S = 30.0
#: seconds one host may take to keep a witness at the end of a job (a host the job lost
#: must not hold the report back for long)
WRITE_TIMEOUT_S = 15.0


def _ts() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _write_one(host: Host, cfg: HostConfig, witness: Witness) -> str:
    """Merge ``witness`` into the host's file for its job; return the file's path."""
    data_dir = str(cfg.data_dir)
    path = witness_path(data_dir, witness.job)
    await host.run(["mkdir", "-p", "--", witness_dir(data_dir)], timeout=30)
    older = None
    res = await host.run(["cat", "--", path], check=False, timeout=30)
    if res.status == 0:
        with contextlib.suppress(StoreError):  # a damaged file is replaced
            older = Witness.parse(res.stdout, where=path)
    await host.write_file(path, witness.merged(older).to_bytes())
    return path


async def write_witnesses(inventory: Inventory, hosts: Sequence[str], *, job: str,
                          seq: int, hash: str, key: str,
                          records: Iterable[tuple[int, str]],
                          opener: HostOpener = open_host,
                          timeout: float = WRITE_TIMEOUT_S,
                          ) -> tuple[list[str], list[str]]:
    """Give each of ``hosts`` the witness of ``job`` whose head is record ``seq`` with
    line hash ``hash`` (the log signed by ``key``), with the job's ``records``.

    Returns (where each witness was written, ``host:path``; one line per host that
    failed). Never raises for a host that fails (``CancelledError`` excepted): the
    others are still written.
    """
    shown = dict(records)
    shown[seq] = hash
    base = Witness(job=job, host="", seq=seq, hash=hash, key=key, ts=_ts(),
                   records=tuple(sorted(shown.items())))

    async def one(name: str) -> str:
        cfg = inventory.host(name)
        host = opener(cfg)
        try:
            witness = dataclasses.replace(base, host=name)
            path = await asyncio.wait_for(_write_one(host, cfg, witness), timeout)
            return f"{name}:{path}"
        finally:
            with contextlib.suppress(Exception):
                await host.close()

    names = list(dict.fromkeys(hosts))
    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    written: list[str] = []
    failed: list[str] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            why = "timed out" if isinstance(result, TimeoutError) else str(result)
            failed.append(f"audit witness not written on {name}: {why}")
        else:
            written.append(result)
    return written, failed


@dataclass
class HostScan:
    """The witnesses found on one host by :func:`scan`."""

    host: str
    #: ok: listed; skipped: by request; unreachable: no answer; failed: it answered
    #: with an error (the detail says which)
    state: Literal["ok", "skipped", "unreachable", "failed"]
    detail: str = ""
    #: (file, witness) for every witness file that parsed
    witnesses: list[tuple[str, Witness]] = field(default_factory=list)
    #: files (or output lines) that are not witnesses
    unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "state": self.state, "detail": self.detail,
                "witnesses": len(self.witnesses), "unreadable": self.unreadable}


async def _scan_one(host: Host, cfg: HostConfig) -> HostScan:
    directory = witness_dir(str(cfg.data_dir))
    scan = HostScan(cfg.name, "ok")
    if not await host.exists(directory):
        scan.detail = "no witnesses"
        return scan
    res = await host.run(["find", directory, "-maxdepth", "1", "-type", "f", "-name",
                          "*.json", "-printf", "%p\t", "-exec", "cat", "--", "{}", ";"],
                         timeout=120)
    for line in res.stdout.splitlines():
        path, tab, body = line.partition("\t")
        if not tab:
            scan.unreadable.append(line[:200])
            continue
        try:
            scan.witnesses.append((path, Witness.parse(body, where=f"{cfg.name}:{path}")))
        except StoreError:
            scan.unreadable.append(path[:200])
    scan.detail = f"{len(scan.witnesses)} witness files"
    return scan


async def scan(inventory: Inventory, *, skip: Iterable[str] = (),
               opener: HostOpener = open_host,
               timeout: float = DEFAULT_TIMEOUT_S) -> list[HostScan]:
    """The witnesses every host of ``inventory`` keeps (hosts in ``skip`` are not asked).
    A host that does not answer within ``timeout`` or fails is ``unreachable`` with the
    reason; never raises for one host (``CancelledError`` excepted)."""
    skipped = set(skip)

    async def one(cfg: HostConfig) -> HostScan:
        if cfg.name in skipped:
            return HostScan(cfg.name, "skipped", "skipped on request")
        host: Host | None = None
        try:
            host = opener(cfg)
            return await asyncio.wait_for(_scan_one(host, cfg), timeout)
        except TimeoutError:
            return HostScan(cfg.name, "unreachable", f"no answer within {timeout:g} s")
        except HostUnreachableError as exc:
            return HostScan(cfg.name, "unreachable", str(exc))
        except VmigrateError as exc:
            return HostScan(cfg.name, "failed", str(exc))
        finally:
            if host is not None:
                with contextlib.suppress(Exception):
                    await host.close()

    return list(await asyncio.gather(*(one(c) for c in inventory.hosts.values())))


def witness_claims(scans: Sequence[HostScan], *, key: str | None,
                   jobs: Iterable[str]) -> tuple[list[Claim], int]:
    """The claims of the witnesses that are about this controller's log (signed with
    ``key``, or of a job the store knows), and how many others were found (witnesses
    another controller left on the same hosts)."""
    known = set(jobs)
    claims: list[Claim] = []
    foreign = 0
    for s in scans:
        for path, w in s.witnesses:
            if w.key == key or w.job in known:
                claims += w.claims(f"the witness on host {s.host} ({path})")
            else:
                foreign += 1
    return claims, foreign


def store_claims(store: Store) -> list[Claim]:
    """The claims of the store's job rows: each job's audit head (a head that is not one
    is a :class:`StoreError`)."""
    return [Claim(seq=seq, hash=digest, where=f"the job row of {job} in {store.path}",
                  job=job, head=True)
            for job, (seq, digest) in store.audit_heads().items()]
