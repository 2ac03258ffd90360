"""``vmigrate audit ...``: check and read the tamper-evident audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vmigrate.audit import AUDIT_FILENAME, VerifyResult, read, repair, verify
from vmigrate.cli._common import err, out, print_json
from vmigrate.config import state_home
from vmigrate.errors import StoreError, UserError

app = typer.Typer(
    rich_markup_mode=None,
    help="Check, read and repair the hash-chained audit log ($VMIGRATE_HOME/audit.jsonl).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _path() -> Path:
    return state_home() / AUDIT_FILENAME


def _have_terminal() -> bool:
    """Whether there is an operator at a terminal to confirm on."""
    return sys.stdin.isatty()


def _torn_text(path: Path, result: VerifyResult, fix: str) -> str:
    return (f"[bold yellow]TORN TAIL[/]: {escape(str(path))} line {result.first_bad} is "
            f"incomplete (a write cut short by a crash); the {result.records} records before "
            f"it are intact. Nothing can be appended until it is removed: {fix}.")


@app.command("verify")
def verify_(as_json: JsonOpt = False) -> None:
    """Check every record's hash and the chain linking them.

    Exits 0 when the log is intact (an absent log is intact and empty), 1 when
    a record was altered, removed, inserted, moved or cut, naming the first bad
    line. Removing records from the very end cannot be detected by the chain
    alone. A torn tail (only the last line incomplete, left by a crash during a
    write) is reported as such: 'vmigrate audit repair' removes it.
    """
    path = _path()
    result = verify(path)
    if as_json:
        print_json({**result.as_dict(), "path": str(path)})
    elif result.ok:
        out.print(f"[green]ok[/]: {result.records} records, chain intact ({escape(str(path))})")
    elif result.torn:
        out.print(_torn_text(path, result, "run 'vmigrate audit repair'"))
    else:
        out.print(
            f"[bold red]TAMPERED[/]: {escape(str(path))} line {result.first_bad}: "
            f"{escape(result.reason or '?')} ({result.records} good records before it)"
        )
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
    (unless --yes), cuts the incomplete line off, and appends an 'audit-repair'
    record with the size and SHA-256 of what it removed, so the repair itself is
    in the chain. Such a line is normally a record whose write never finished
    (nobody was told it was written); its SHA-256 in the repair record keeps
    what was removed identifiable.

    Anything else ('audit verify' says TAMPERED: a record altered, removed or
    inserted) is never repaired: the log is left as it is, as evidence. Exits 0
    once repaired, 1 when there is nothing to repair or the damage is not a torn
    tail, 2 when confirmation is needed but there is no terminal to ask on.
    """
    path = _path()
    result = verify(path)
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
    done = repair(path)
    after = verify(path)
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
