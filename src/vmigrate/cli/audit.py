"""``vmigrate audit ...``: check and read the tamper-evident audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vmigrate.audit import AUDIT_FILENAME, read, verify
from vmigrate.cli._common import out, print_json
from vmigrate.config import state_home

app = typer.Typer(
    rich_markup_mode=None,
    help="Check and read the hash-chained audit log ($VMIGRATE_HOME/audit.jsonl).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _path() -> Path:
    return state_home() / AUDIT_FILENAME


@app.command("verify")
def verify_(as_json: JsonOpt = False) -> None:
    """Check every record's hash and the chain linking them.

    Exits 0 when the log is intact (an absent log is intact and empty), 1 when
    a record was altered, removed, inserted, moved or cut, naming the first bad
    line. Removing records from the very end cannot be detected by the chain
    alone.
    """
    path = _path()
    result = verify(path)
    if as_json:
        print_json({**result.as_dict(), "path": str(path)})
    elif result.ok:
        out.print(f"[green]ok[/]: {result.records} records, chain intact ({escape(str(path))})")
    else:
        out.print(
            f"[bold red]TAMPERED[/]: {escape(str(path))} line {result.first_bad}: "
            f"{escape(result.reason or '?')} ({result.records} good records before it)"
        )
    if not result.ok:
        raise typer.Exit(1)


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
