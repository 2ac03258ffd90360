"""``vmigrate migrate`` and ``vmigrate job ...``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmigrate.audit.log import AuditLog
from vmigrate.cli._common import (
    CTX,
    err,
    non_negative,
    out,
    positive,
    print_json,
    run,
    survive_terminal,
)
from vmigrate.config import state_home
from vmigrate.errors import ConflictError, UserError
from vmigrate.migration.report import MigrationReport, load_report
from vmigrate.plan.policy import DEFAULT_POLICY
from vmigrate.plan.predict import measured_figures
from vmigrate.progress import Event
from vmigrate.service.migrations import (
    MODE_CHOICES,
    MigrationRequest,
    MigrationService,
    controller_alive,
)
from vmigrate.service.planning import DEFAULT_MAX_AGE_S
from vmigrate.store import JobRecord

job_app = typer.Typer(
    rich_markup_mode=None,
    help="List, inspect, cancel and recover migration jobs.",
    no_args_is_help=True,
)


def _audit() -> AuditLog:
    return AuditLog(state_home() / "audit.jsonl")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


class _Display:
    """Live progress on a terminal; one line per phase, step and note otherwise."""

    def __init__(self) -> None:
        self.live = err.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self._last = ""

    def __enter__(self) -> _Display:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[phase]:<8}"), BarColumn(),
                TextColumn("{task.fields[moved]}"), TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[dirty]}"), TimeElapsedColumn(),
                TextColumn("[cyan]{task.fields[step]}"), console=err, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("migrate", total=None, phase="begin", moved="",
                                               rate="", dirty="", step="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def __call__(self, ev: Event) -> None:
        f = ev.figures
        if self.progress is not None and self.task is not None:
            fields: dict[str, Any] = {}
            if ev.phase:
                fields["phase"] = ev.phase
            if ev.done is not None:
                fields["moved"] = (f"{_mib(ev.done)} / {_mib(ev.total)}" if ev.total
                                   else _mib(ev.done))
                self.progress.update(self.task, total=ev.total or None, completed=ev.done)
            if "mbps" in f:
                fields["rate"] = f"{f['mbps']:,.0f} Mbit/s"
            if "dirty_bytes_rate" in f:
                fields["dirty"] = f"dirty {f['dirty_bytes_rate'] / 2**20:,.1f} MiB/s"
            if ev.step:
                fields["step"] = ev.step
            self.progress.update(self.task, **fields)
            if ev.message and ev.message != ev.phase:
                self.progress.console.print(f"  {ev.message}", highlight=False)
            return
        line = ev.message or (f"{ev.phase}: {ev.step}" if ev.step else ev.phase or "")
        if ev.done is not None and ev.total and not f:  # a disk copy: one line per 10 %
            line = f"{ev.step or ev.phase}: {10 * (10 * ev.done // ev.total)} % of " \
                   f"{_mib(ev.total)}"
        if line and line != self._last:
            err.print(f"  {line}", highlight=False)
            self._last = line


def render_report(data: dict[str, Any]) -> None:
    """The report as a table: the same rows for every mode, filled from what moved."""
    r = load_report(data)
    colour = {"completed": "green", "needs-operator": "yellow"}.get(r.status, "red")
    table = Table(title=f"migration {r.job}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", f"[{colour}]{r.status}[/]" + (f" ({r.error})" if r.error else ""))
    strategies = f"{r.memory_strategy} + {r.storage_strategy}" if r.memory_strategy else r.mode
    table.add_row("vm", f"{r.vm}: {r.source} -> {r.dest} ({r.mode}: {strategies}, streams "
                  f"{r.stream_security})")
    m = r.memory
    if m is not None:
        table.add_row("policy", m.policy_description or m.policy)
    for step in r.steps:
        table.add_row("", f"t={step.t}s it={step.iteration}: {step.action} ({step.detail})")
    table.add_row("total time", f"{r.total_time_s} s" + (
        f" (of which {r.checks_s} s checking the guest on {r.dest})" if r.checks_s else ""))
    if m is not None:
        table.add_row("downtime (QEMU)", f"{m.qemu_downtime_ms} ms")
    obs = r.observed_downtime_ms
    how = "1 ms ping" if r.probe else "guest stop -> running" if m is None else "-"
    table.add_row("downtime (observed)", "-" if obs is None else f"{obs:.1f} ms ({how})")
    if r.answer_after_switch_ms is not None or r.announced:
        table.add_row("after the switch", (
            f"answered {r.answer_after_switch_ms:.0f} ms after it ran on {r.dest}"
            if r.answer_after_switch_ms is not None else "no answer measured")
            + ("; NICs announced" if r.announced else ""))
    table.add_row("on the wire", _mib(r.bytes_transferred) + (
        f" (memory {_mib(m.bytes)} of {_mib(m.ram_bytes)} RAM)" if m is not None else ""))
    if m is not None:
        table.add_row("iterations", f"{m.iterations}, max throttle {m.max_throttle_pct} %")
        if m.postcopy:
            table.add_row("post-copy", f"{m.postcopy_time_s} s, {m.postcopy_recoveries} "
                          "recoveries")
    for d in r.disks:
        table.add_row("disk", f"{d.source} ({d.format}) -> {d.target} ({d.target_format}): "
                      f"{_mib(d.data_bytes)} data, {_mib(d.wire_bytes)} on the wire, "
                      f"{_mib(d.resent_bytes)} resent, in {d.seconds} s"
                      + (f" ({d.mbps} Mbit/s)" if d.mbps else "")
                      + (f", handover {d.handover_s} s" if d.handover_s is not None else "")
                      + f"; verified {d.verified}"
                      + (", source deleted" if d.source_deleted else ""))
    _prediction_rows(table, r)
    for c in r.checks:
        mark = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]unknown[/]"}
        table.add_row(f"check {c.name}", f"{mark[c.ok]} {c.detail}")
    for note in r.notes:
        table.add_row("note", note)
    for e in r.cleanup_errors:
        table.add_row("[red]cleanup error[/]", e)
    out.print(table)


def _pct(pred: float, measured: float) -> str:
    return "" if not measured else f", {100 * (pred - measured) / measured:+.0f} %"


def _prediction_rows(table: Table, r: MigrationReport) -> None:
    pred = r.prediction
    if not pred:
        return
    f = pred["figures"]
    m = measured_figures(r.model_dump(mode="json"))
    how = "chosen by the plan" if pred.get("chosen_by") == "auto" else "predicted"
    unc = f" ±{pred['uncertainty']:.0%}" if pred.get("uncertainty") is not None else ""
    table.add_row("predicted", f"{pred['mode']} ({how}{unc}"
                  + (", post-copy expected" if pred.get("postcopy") else "") + ")")
    rows = (("total time", f["total_time_s"], m.total_time_s if m else None, "s"),
            ("downtime", f["downtime_ms"], m.downtime_ms if m else None, "ms"),
            ("on the wire", f["wire_bytes"] / 2**20, m.wire_bytes / 2**20 if m else None,
             "MiB"))
    for what, p, got, unit in rows:
        table.add_row(f"  {what}", f"predicted {p:,.1f} {unit}" + (
            f", measured {got:,.1f} {unit}{_pct(p, got)}" if got is not None else ""))
    for line in pred.get("explanation") or []:
        table.add_row("", line)


def migrate(
    name: Annotated[str, typer.Argument(help="VM to move.")],
    to: Annotated[str, typer.Option("--to", help="Destination host (inventory name).")],
    mode: Annotated[str, typer.Option(
        help="auto: assess the VM and the link (or reuse an assessment younger than "
        "--max-age), predict every mode and take the one the decision matrix picks "
        "('vmigrate plan' shows the same). "
        "live: memory only, the disks stay where they are (shared storage). online: "
        "memory and disks, copied over NBD into a pool of the destination (no shared "
        "storage). cold: shut the guest down, copy the disks (resumable, encrypted, "
        "verified), start it on the destination. warm: copy the disks while the guest "
        "runs, then incremental rounds; it stops only for the last delta.")] = "live",
    shutdown_timeout: Annotated[float, typer.Option(
        help="cold/warm: seconds the guest gets to power off after the ACPI button.",
        callback=positive)] = 60.0,
    force: Annotated[bool, typer.Option(
        help="cold/warm: stop the guest hard when it did not power off in time "
        "(--no-force: fail instead, the guest runs on).")] = True,
    cutover: Annotated[str | None, typer.Option(
        help="warm: when to cut over: HH:MM (today, local time), +SECONDS, or an epoch "
        "time. Rounds go on until then. Default: as soon as a round is small.")] = None,
    target_storage: Annotated[str | None, typer.Option(
        help="online/cold/warm: the destination pool the disks go to (inventory "
        "[hosts.X.pools]); default: local.")] = None,
    target_format: Annotated[str | None, typer.Option(
        help="online/cold/warm: raw or qcow2 for the copies (default: each disk's own "
        "format).")] = None,
    delete_source: Annotated[bool, typer.Option(
        "--delete-source", help="online/cold/warm: delete the source images once the VM "
        "runs on the destination (kept by default).")] = False,
    policy: Annotated[str, typer.Option(
        help="Convergence policy: adaptive (plans the path from the latest assessment "
        "and each pass), or a fixed schedule: balanced, minimal-downtime, postcopy, "
        "suspend, or one defined under policies in the inventory "
        "(README: Convergence policies).")] = DEFAULT_POLICY,
    downtime_ms: Annotated[int | None, typer.Option(
        help="Downtime limit in ms (overrides the policy's): the starting limit of a "
        "fixed policy, the most an adaptive one may take.", callback=positive)] = None,
    bandwidth: Annotated[str | None, typer.Option(
        help="Bandwidth cap, bytes/s (100M, 1G) or bits (800mbit).")] = None,
    parallel: Annotated[int | None, typer.Option(
        help="Parallel streams (multifd channels, >= 2). Not with post-copy.")] = None,
    compress: Annotated[str | None, typer.Option(
        help="zstd (with --parallel) or xbzrle (delta pages).")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds before the policy's timeout action (abort or complete).",
        callback=positive)] = None,
    tls: Annotated[bool, typer.Option(help="Encrypt the stream with the hosts' x509 "
                                      "credentials; only the source host's certificate may "
                                      "connect to the destination. --no-tls is recorded in "
                                      "the report and needs --insecure for live and online.")
                   ] = True,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="With --no-tls: accept that anyone on the migration network may "
        "connect to the destination's migration port and (online) its writable NBD "
        "export while the migration runs.")] = False,
    max_age: Annotated[float, typer.Option(
        help="auto, and the prediction kept in the report: reuse an assessment of this "
        "route younger than this many seconds.", callback=non_negative)
    ] = DEFAULT_MAX_AGE_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Move a VM to another host and print the migration report.

    Every mode runs the same five phases (begin, prepare, perform, finish, confirm).
    Until the guest runs on the destination (the point of no return) a failure or a
    cancel (Ctrl-C, 'vmigrate job cancel') rolls back: the source runs on and the
    destination is left clean. After it, the migration only finishes forward.

    The controller survives its terminal: if the SSH session drops or the output pipe
    closes, the migration goes on and its report is stored ('vmigrate job show').

    Exit status 0 when the migration completed, 1 when it failed or was cancelled
    (rolled back), 4 when it needs an operator (nothing was destroyed, the VM stays
    locked: see 'vmigrate job show' and 'vmigrate job recover'), 5 when the VM moved
    but the checks after the switchover failed (it needs an operator too), 8 when a
    cold or warm copy ran out of space on the destination (rolled back). A job
    refused in begin (nothing was started) exits with its error's status: 2 a wrong
    request (e.g. TLS certificates that are expired, of another CA, or do not name
    the hosts), 3 a missing prerequisite, 7 a host whose SSH key is not the recorded one.
    """
    if mode not in MODE_CHOICES:
        raise typer.BadParameter(f"use one of {', '.join(MODE_CHOICES)}", param_hint="--mode")
    survive_terminal()
    req = MigrationRequest(
        vm=name, dest=to, mode=mode, policy=policy, downtime_ms=downtime_ms,
        bandwidth=bandwidth, parallel=parallel, compress=compress, timeout=timeout, tls=tls,
        insecure=insecure,
        target_storage=target_storage, target_format=target_format,
        delete_source=delete_source, shutdown_timeout=shutdown_timeout, force=force,
        cutover=cutover)
    with _Display() as display:
        service = MigrationService(CTX.inventory(), CTX.store(), _audit(), progress=display)

        async def go() -> MigrationReport:
            chosen, prediction, plan = await service.choose(req, max_age=max_age)
            if mode == "auto" and plan is not None:
                from vmigrate.cli.plan import render_plan
                render_plan(plan, err)

            def started(job_id: str) -> None:
                err.print(f"job {job_id}: {name} -> {to} ({chosen}, policy {policy})",
                          highlight=False)

            return await service.migrate(req, mode=chosen, prediction=prediction,
                                         on_job=started)

        report = run(go())
    data = report.model_dump(mode="json")
    if as_json:
        print_json(data)
    else:
        render_report(data)
    if report.status == "needs-operator":
        if report.verification.failed:
            v = report.verification
            err.print(f"error: {name} runs on {to} but did not arrive intact: "
                      f"{v.memcheck_line or v.guest_crash or report.error}", highlight=False)
            raise typer.Exit(5)
        raise typer.Exit(4)
    if report.status != "completed":
        # refused in begin: the error's own status (2 a wrong request, 7 a host key ...)
        raise typer.Exit(report.exit_status or 1)


def _job_row(j: JobRecord) -> dict[str, Any]:
    return {"id": j.id, "vm": j.vm, "mode": j.mode, "source": j.source, "dest": j.dest,
            "phase": j.phase, "status": j.status, "error": j.error,
            "controller_alive": controller_alive(j) if j.active else None}


@job_app.command("list")
def job_list(
    active: Annotated[bool, typer.Option(
        "--active", help="Only jobs that lock their VM (running, or waiting for an "
        "operator).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List migration jobs, oldest first."""
    jobs = [j for j in CTX.store().list_jobs() if j.locks_vm or not active]
    if as_json:
        print_json([_job_row(j) for j in jobs])
        return
    table = Table("id", "vm", "mode", "route", "phase", "status", "error")
    for j in jobs:
        table.add_row(j.id, j.vm, j.mode, f"{j.source} -> {j.dest}", j.phase, j.status,
                      (j.error or "")[:60])
    out.print(table)


@job_app.command("show")
def job_show(
    job_id: Annotated[str, typer.Argument(help="Job id (a unique prefix is enough).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a job and its migration report (reports of older versions are shown in
    today's shape)."""
    j = CTX.store().get_job(job_id)
    report = (load_report({**j.report, "status": j.status, "error": j.error})
              if j.report else None)
    if as_json:
        print_json({**_job_row(j), "report": report.model_dump(mode="json")
                    if report else None})
        return
    if report is not None:
        render_report(report.model_dump(mode="json"))
    else:
        print_json(_job_row(j))


@job_app.command("cancel")
def job_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id (a unique prefix is enough).")],
) -> None:
    """Ask a running job to cancel. Before the point of no return (the guest running
    on the destination) it rolls back: the source runs on and the destination is
    cleaned. After it, the migration finishes forward and the report says the cancel
    came too late."""
    j = CTX.store().request_cancel(job_id)
    out.print(f"cancel requested for job {j.id} ({j.vm}, phase {j.phase})")


@job_app.command("recover")
def job_recover(
    job_id: Annotated[str | None, typer.Argument(
        help="Job to recover (default: every running job whose controller died, and every "
        "job waiting for an operator).")] = None,
    force: Annotated[bool, typer.Option(help="Even if its controller seems alive.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Settle jobs whose controller died, or that wait for an operator, from the state
    saved with the job and what the hosts say now: finish forward what passed the
    point of no return, roll back what did not, and leave for an operator (with
    nothing destroyed) what the hosts do not tell. A job that cannot be loaded is
    named and skipped. Exit status 1 if any job was skipped."""
    store = CTX.store()
    service = MigrationService(CTX.inventory(), store, _audit())
    if job_id is not None:
        job = store.get_job(job_id)
        if not job.locks_vm:
            raise ConflictError(f"job {job.id} is {job.status}: nothing to recover")
        jobs = [job]
    else:
        jobs = service.recoverable()
    done = run(service.recover(jobs, force=force))
    if as_json:
        print_json([r.as_dict() for r in done])
    else:
        if not done:
            out.print("no abandoned jobs")
        for r in done:
            out.print(f"job {r.job} ({r.vm}, phase {r.phase}): {r.outcome}: {r.detail}",
                      highlight=False)
    if any(r.outcome == "skipped" for r in done):
        raise typer.Exit(1)


@job_app.command("resolve")
def job_resolve(
    job_id: Annotated[str, typer.Argument(help="Job waiting for an operator.")],
    keep: Annotated[str, typer.Option(
        "--keep", help="destination (or dest): the guest stays where it runs now (the "
        "source QEMU "
        "is stopped and released); source: the destination QEMU is stopped and the guest "
        "runs on the source again (resumed, or booted from its own disks).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking (needed "
                                      "without a terminal).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Settle by hand a job that waits for an operator (needs-operator), once you have
    looked at both hosts: keep the guest on the destination or on the source. The VM
    is unlocked afterwards. No image is deleted.

    It first asks both hosts what runs where and refuses (exit status 2, nothing
    changed, the VM stays locked) a decision that would lose the guest or that it
    cannot check: a host that does not answer; keeping the destination when no
    complete guest runs there or a post-copy has not finished; keeping the source
    when neither its QEMU nor its disks are there. What it found is printed.

    Keeping the source after the point of no return resurrects the guest as it was
    when it left: on shared storage the destination may have written to its disks
    since. 'vmigrate job recover' is the automatic way (it finishes or rolls back what
    the hosts allow); this is for what it cannot decide.
    """
    if keep not in ("destination", "dest", "source"):
        raise typer.BadParameter("use destination (or dest) or source", param_hint="--keep")
    store = CTX.store()
    job = store.get_job(job_id)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("resolving a job asks for confirmation: pass --yes")
        host = job.source if keep == "source" else job.dest
        typer.confirm(f"keep {job.vm} on the {keep} ({host}) and unlock it?", abort=True,
                      err=True)
    service = MigrationService(CTX.inventory(), store, _audit())
    r = run(service.resolve(job, "source" if keep == "source" else "destination"))
    if as_json:
        print_json(r.as_dict())
    else:
        out.print(f"job {r.job} ({r.vm}): {r.outcome}: {r.detail}", highlight=False)
