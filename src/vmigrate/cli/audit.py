"""``vmigrate audit ...``: check, read, export and repair the signed audit log."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vmigrate.audit import (
    AUDIT_FILENAME,
    PUBLIC_NAME,
    Claim,
    PublicKey,
    VerifyResult,
    load_public_key,
    read,
    repair,
    verify,
)
from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.config import state_home
from vmigrate.errors import StoreError, UserError
from vmigrate.service.witness import DEFAULT_TIMEOUT_S, HostScan, scan, store_claims, witness_claims
from vmigrate.store import Store

app = typer.Typer(
    rich_markup_mode=None,
    help="Check, read, export and repair the signed, hash-chained audit log "
         "($VMIGRATE_HOME/audit.jsonl).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
STORE_NAME = "vmigrate.db"


def _path() -> Path:
    return state_home() / AUDIT_FILENAME


def _have_terminal() -> bool:
    """Whether there is an operator at a terminal to confirm on."""
    return sys.stdin.isatty()


def _store_claims() -> list[Claim]:
    """The job rows' audit heads (none when there is no store yet: none is created)."""
    db = state_home() / STORE_NAME
    if not db.exists():
        return []
    store = Store(db)
    try:
        return store_claims(store)
    finally:
        store.close()


def _torn_text(path: Path, result: VerifyResult, fix: str) -> str:
    return (f"[bold yellow]TORN TAIL[/]: {escape(str(path))} line {result.first_bad} is "
            f"incomplete (a write cut short by a crash); the {result.records} records before "
            f"it are intact. Nothing can be appended until it is removed: {fix}.")


def _scan_text(scans: list[HostScan]) -> str:
    parts = []
    for s in scans:
        text = f"{s.host} {s.state}" + (f" ({s.detail})" if s.detail else "")
        if s.unreadable:
            text += f", {len(s.unreadable)} unreadable witness files"
        parts.append(escape(text))
    return "; ".join(parts)


@app.command("verify")
def verify_(
    offline: Annotated[bool, typer.Option(
        "--offline", help="Do not ask the hosts for their witnesses (check the chain, the "
                          "signatures and the job rows' heads only).")] = False,
    skip_host: Annotated[list[str] | None, typer.Option(
        "--skip-host", metavar="HOST", help="Do not ask this host (repeatable).")] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", help="Check signatures against this public key file "
                                      f"(default: $VMIGRATE_HOME/{PUBLIC_NAME}).")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, max=3600.0,
        help="Seconds each host may take to list its witnesses.")] = DEFAULT_TIMEOUT_S,
    as_json: JsonOpt = False,
) -> None:
    """Check every record: its hash, its signature, the chain linking them, and what
    others hold about the log.

    Signatures are checked against the controller's public key (its fingerprint is
    printed: compare it with a copy kept elsewhere). The log is then compared with
    each job's head kept in the store and with the witnesses the hosts of every job
    keep (unless --offline; a host that does not answer is named and skipped). A
    rewritten log (even re-signed) or one cut at the end no longer matches them.

    Exits 0 when everything agrees (an absent log is intact and empty); 1 when a record
    was altered, removed, inserted, moved, cut, signed by another key, or disagrees
    with a job head or a witness, naming the first such record and where the witness
    is; 9 when the log or the key cannot be read at all (nothing was checked); 2 for a
    wrong request. Records written before signing (format v1) are reported as
    unsigned. A torn tail (only the last line incomplete, left by a crash during a
    write) is reported as such: 'vmigrate audit repair' removes it.
    """
    path = _path()
    skip = list(skip_host or [])
    inventory = None
    if not offline:
        inventory = CTX.inventory(required=False)
        for name in skip:
            inventory.host(name)  # an unknown host is a wrong request
    key = PublicKey.load(key_file) if key_file is not None else load_public_key(state_home())
    claims = _store_claims()
    job_heads = len(claims)
    scans: list[HostScan] = []
    foreign = 0
    if inventory is not None and inventory.hosts:
        scans = run(scan(inventory, skip=skip, timeout=timeout))
        seen, foreign = witness_claims(scans, key=key.fingerprint if key else None,
                                       jobs={c.job for c in claims if c.job})
        claims += seen
    result = verify(path, key=key, claims=claims)
    if as_json:
        print_json({**result.as_dict(), "path": str(path),
                    "key_file": str(key_file or state_home() / PUBLIC_NAME),
                    "job_heads": job_heads, "hosts": [s.as_dict() for s in scans],
                    "foreign_witnesses": foreign, "offline": offline})
    else:
        if result.key is not None:
            out.print(f"key: {result.key} ({escape(str(key_file or state_home() / PUBLIC_NAME))})")
        else:
            out.print("key: none (no audit key yet: it is created with the first record)")
        if result.ok:
            signed = ("signatures valid" if result.signed else "no signed records")
            out.print(f"[green]ok[/]: {result.records} records, chain intact, {signed} "
                      f"({escape(str(path))})")
        elif result.torn:
            out.print(_torn_text(path, result, "run 'vmigrate audit repair'"))
        else:
            out.print(f"[bold red]TAMPERED[/]: {escape(str(path))} record {result.first_bad}: "
                      f"{escape(result.reason or '?')} ({result.records} good records before "
                      "it)")
        if result.unsigned:
            out.print(f"note: {result.unsigned} records are unsigned (format v1, written "
                      "before records were signed): only their chain is checked")
        where = "offline: no witnesses asked" if offline else (
            _scan_text(scans) if scans else "no hosts in the inventory")
        out.print(f"compared with {job_heads} job heads and {len(claims) - job_heads} "
                  f"witness claims; hosts: {where}")
        if foreign:
            out.print(f"note: {foreign} witnesses on these hosts belong to another "
                      "controller's log (another key, a job this store does not know)")
    if not result.ok:
        raise typer.Exit(1)


@app.command("repair")
def repair_(
    yes: Annotated[bool, typer.Option("--yes", "-y",
                                      help="Repair without asking (needed without a terminal).")
                   ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a torn last line so that records can be appended again.

    A crash while a record was being written can leave the log's last line
    incomplete (a "torn tail"); vmigrate then refuses to append to the log, so no
    migration can start. This command shows the damage, asks for confirmation
    (unless --yes), cuts the incomplete line off, and appends a signed 'audit-repair'
    record with the size and SHA-256 of what it removed, so the repair itself is
    in the chain. Such a line is normally a record whose write never finished
    (nobody was told it was written); its SHA-256 in the repair record keeps
    what was removed identifiable.

    Anything else ('audit verify' says TAMPERED: a record altered, removed, inserted,
    badly signed, or missing though a job row names it) is never repaired: the log is
    left as it is, as evidence. Exits 0 once repaired, 1 when there is nothing to
    repair or the damage is not a torn tail, 2 when confirmation is needed but there
    is no terminal to ask on, 9 when the log or the key cannot be read.
    """
    path = _path()
    claims = _store_claims()
    result = verify(path, key_dir=state_home(), claims=claims)
    if result.ok:
        raise StoreError(f"audit log {path} is intact ({result.records} records): "
                         "nothing to repair")
    if not result.torn:
        raise StoreError(f"audit log {path} line {result.first_bad}: {result.reason}: not a "
                         "torn last line but damage inside the log (possible tampering), which "
                         "is never repaired; keep the file as evidence")
    info = err if as_json else out  # keep stdout for the JSON
    info.print(_torn_text(path, result, "this command removes it"))
    if not yes:
        if not _have_terminal():
            raise UserError("audit repair needs confirmation and there is no terminal to ask "
                            "on: pass --yes to repair")
        if not typer.confirm(f"Remove the incomplete line {result.first_bad} and record the "
                             "repair in the log?", err=True):
            err.print("not repaired: the log is unchanged")
            raise typer.Exit(1)
    done = repair(path, key_dir=state_home(), claims=claims)
    after = verify(path, key_dir=state_home(), claims=claims)
    if as_json:
        print_json(done.as_dict())
    else:
        out.print(f"[green]repaired[/]: removed {done.removed_bytes} bytes "
                  f"(sha256 {done.removed_sha256}) after {done.records_kept} intact records; "
                  f"recorded as record {done.record.seq} ({done.record.event})")
    if not after.ok:
        raise StoreError(f"audit log {path} was repaired but 'audit verify' now fails at line "
                         f"{after.first_bad}: {after.reason}")
    if not as_json:
        out.print(f"[green]ok[/]: 'vmigrate audit verify' passes: {after.records} records, "
                  "chain intact")


@app.command()
def show(
    job: Annotated[str | None, typer.Option("--job", help="Only this migration job's records.")
                   ] = None,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=1,
                                             help="Only the last N records.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List audit records, oldest first. Does not check the chain (see 'audit verify')."""
    records = read(_path(), job=job)
    if tail is not None:
        records = records[-tail:]
    if as_json:
        print_json([r.as_dict() for r in records])
        return
    if not records:
        out.print("no audit records" + (f" for job {escape(job)}" if job else ""))
        return
    table = Table("seq", "time (UTC)", "job", "event", "data")
    for r in records:
        data = json.dumps(r.data, sort_keys=True, default=str)
        table.add_row(str(r.seq), r.ts.replace("T", " ").rstrip("Z")[:23], escape(r.job or "-"),
                      escape(r.event), escape(data))
    out.print(table)


def _parse_since(text: str) -> datetime:
    """An ISO-8601 date or time (no zone: UTC); :class:`UserError` otherwise."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--since {text!r}: not an ISO-8601 date or time (e.g. 2025-01-31 "
                        "or 2025-01-31T12:00:00Z)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@app.command()
def export(
    job: Annotated[str | None, typer.Option("--job", help="Only this migration job's records.")
                   ] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="TIME",
        help="Only records written at or after TIME (ISO 8601; no zone means UTC).")] = None,
    after_seq: Annotated[int | None, typer.Option(
        "--after-seq", min=0, metavar="N",
        help="Only records after record N (ship a log incrementally).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write to FILE (replaced atomically) instead of standard output.")] = None,
) -> None:
    """Write audit records as JSON lines, for a SIEM.

    Each line is one record exactly as the log holds it (canonical JSON: keys sorted,
    with its seq, prev, hash, the fingerprint of the key that signed it and the
    signature), so the receiver can check the chain and the signatures itself with the
    controller's public key ('vmigrate audit key'). Records of format v1 are unsigned.
    Does not check the chain: run 'vmigrate audit verify' for that. Exits 0 (also when
    no record matches), 1 when a line of the log is not a record, 9 when the log cannot
    be read, 2 for a wrong request.
    """
    when = _parse_since(since) if since is not None else None
    records = read(_path(), job=job)
    lines: list[str] = []
    for r in records:
        if after_seq is not None and r.seq <= after_seq:
            continue
        if when is not None:
            try:
                at = r.time if r.time.tzinfo is not None else r.time.replace(tzinfo=UTC)
            except ValueError:
                continue
            if at < when:
                continue
        lines.append(r.line() + "\n")
    if output is None:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        return
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from exc
    err.print(f"exported {len(lines)} records to {escape(str(output))}")


@app.command()
def key(as_json: JsonOpt = False) -> None:
    """Show the controller's audit public key and its fingerprint.

    The key signs every record; it is created with the first record (the private key,
    mode 0600, next to the log). Keep a copy of the public key line elsewhere: 'audit
    verify --key FILE' checks the log against it.
    """
    home = state_home()
    pub = load_public_key(home)
    info: dict[str, Any] = {
        "fingerprint": pub.fingerprint if pub else None,
        "public_key": pub.text().strip() if pub else None,
        "public_key_file": str(home / PUBLIC_NAME),
    }
    if as_json:
        print_json(info)
    elif pub is None:
        out.print("no audit key yet: it is created with the first record")
    else:
        out.print(f"fingerprint: {pub.fingerprint}")
        out.print(f"public key:  {escape(pub.text().strip())} "
                  f"({escape(str(home / PUBLIC_NAME))})")
