"""``vmigrate migrate`` and ``vmigrate job ...``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmigrate.audit.log import AuditLog
from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.config import Inventory, state_home
from vmigrate.errors import ConflictError, UserError
from vmigrate.migration import live
from vmigrate.migration.cold import ColdMigration, DiskMoveOptions, WarmMigration
from vmigrate.migration.online import OnlineMigration, OnlineOptions
from vmigrate.migration.recover import Recovery, controller_alive, recover
from vmigrate.plan.policy import (
    MigrationOptions,
    load_policies,
    parse_bandwidth,
    resolve_policy,
)
from vmigrate.plan.predict import measured_figures
from vmigrate.service.assess import AssessOptions
from vmigrate.service.planning import (
    DEFAULT_MAX_AGE_S,
    latest_assessment,
    make_plan,
    prediction_record,
)
from vmigrate.store import JobRecord, Store

job_app = typer.Typer(
    rich_markup_mode=None,
    help="List, inspect, cancel and recover migration jobs.",
    no_args_is_help=True,
)


def _audit() -> AuditLog:
    return AuditLog(state_home() / "audit.jsonl")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


class _Display:
    """Live progress on a terminal; one line per phase and policy step otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and err.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self._last = ""

    def __enter__(self) -> _Display:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[phase]:<8}"),
                BarColumn(),
                TextColumn("{task.fields[disk]}"),
                TextColumn("{task.fields[moved]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[dirty]}"),
                TextColumn("it {task.fields[iteration]}"),
                TimeElapsedColumn(),
                TextColumn("[cyan]{task.fields[step]}"),
                console=err,
                transient=True,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("migrate", total=None, phase="begin", moved="",
                                               rate="", dirty="", iteration="-", step="",
                                               disk="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def __call__(self, p: live.Progress) -> None:
        if not self.enabled:
            return
        if self.progress is not None and self.task is not None:
            fields: dict[str, Any] = {"phase": p.phase}
            if p.disk is not None:
                fields["disk"] = f"disks {_mib(p.disk[0])} / {_mib(p.disk[1])}"
                if p.sample is None:
                    self.progress.update(self.task, total=p.disk[1] or None,
                                         completed=p.disk[0])
            if p.sample is not None:
                s = p.sample
                total = s.transferred + s.remaining
                fields.update(
                    moved=f"{_mib(s.transferred)} sent, {_mib(s.remaining)} left",
                    rate=f"{s.mbps:,.0f} Mbit/s",
                    dirty=f"dirty {s.dirty_rate * s.page_size / 2**20:,.1f} MiB/s",
                    iteration=str(s.iteration),
                )
                self.progress.update(self.task, total=total or None, completed=s.transferred)
            if p.step or p.note:
                fields["step"] = p.note or p.step
            self.progress.update(self.task, **fields)
            if p.note:
                self.progress.console.print(f"  {p.note}")
            return
        line = p.note or (f"{p.phase}: {p.step}" if p.step else p.phase)
        if p.disk is not None and p.disk[1]:  # one line per 10 % of the disk copy
            line += f" ({10 * (10 * p.disk[0] // p.disk[1])} % of {_mib(p.disk[1])})"
        if line != self._last:
            err.print(f"  {line}", highlight=False)
            self._last = line


def render_report(r: dict[str, Any]) -> None:
    colour = {"completed": "green", "needs-operator": "yellow"}.get(r["status"], "red")
    table = Table(title=f"migration {r['job']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", f"[{colour}]{r['status']}[/]" + (
        f" ({r['error']})" if r.get("error") else ""))
    disk_mode = r["mode"] in ("cold", "warm")  # no memory migration: disks on our engine
    table.add_row("vm", f"{r['vm']}: {r['source']} -> {r['dest']} ({r['mode']}, " + (
        "AES-256-GCM stream)" if disk_mode else f"{'TLS' if r['tls'] else 'no TLS'})"))
    if not disk_mode:
        table.add_row("policy", r.get("policy_description") or r["policy"])
    for step in r.get("steps", []):
        table.add_row("", f"t={step['t']}s it={step['iteration']}: {step['action']} "
                      f"({step['detail']})")
    table.add_row("total time", f"{r.get('total_time_s')} s" + (
        f" (of which {r['checks_s']} s checking the guest on {r['dest']})"
        if r.get("checks_s") else ""))
    obs = r.get("observed_downtime_ms")
    if disk_mode:
        table.add_row("downtime (observed)", "-" if obs is None else
                      f"{obs:.1f} ms (guest stop -> answering on {r['dest']})")
        table.add_row("transferred", _mib(r.get("bytes_transferred")) + " on the wire")
        for d in r.get("disks", []):
            table.add_row("disk", f"{d['source']} ({d['format']}) -> {d['target']} "
                          f"({d['target_format']}): {_mib(d.get('data_bytes'))} data, "
                          f"{_mib(d.get('wire_bytes'))} on the wire, "
                          f"{_mib(d.get('resent_bytes'))} resent, in {d.get('transfer_s')} s; "
                          f"verified {d.get('verified')}"
                          + (", source deleted" if d.get("source_deleted") else ""))
    else:
        table.add_row("downtime (QEMU)", f"{r.get('qemu_downtime_ms')} ms")
        table.add_row("downtime (observed)",
                      "-" if obs is None else f"{obs:.1f} ms (1 ms ping)")
        table.add_row("transferred / RAM", f"{_mib(r.get('bytes_transferred'))} / "
                      f"{_mib(r.get('ram_bytes'))}")
        table.add_row("iterations", str(r.get("iterations")))
    for d in ([] if disk_mode else r.get("disks", [])):
        table.add_row("disk", f"{d['source']} ({d['format']}) -> {d['target']} "
                      f"({d['target_format']}): {_mib(d.get('bytes'))} in {d.get('ready_s')} s "
                      f"to ready ({d.get('mirror_mbps')} Mbit/s), handover "
                      f"{d.get('handover_s')} s"
                      + (", source deleted" if d.get("source_deleted") else ""))
    if not disk_mode:
        table.add_row("max throttle", f"{r.get('max_throttle_pct', 0)} %")
    if r.get("postcopy"):
        table.add_row("post-copy", f"{r.get('postcopy_time_s')} s, "
                      f"{r.get('postcopy_recoveries', 0)} recoveries")
    _prediction_rows(table, r)
    v = r.get("verification", {})
    checks = ", ".join(f"{k}={val}" for k, val in v.items() if val is not None
                       and k != "memcheck_line")
    table.add_row("verification", checks or "-")
    for e in r.get("cleanup_errors", []):
        table.add_row("[red]cleanup error[/]", e)
    out.print(table)


def _predicted(inv: Inventory, store: Store, name: str, to: str, mode: str,
               opts: MigrationOptions, max_age: float, shutdown_timeout: float
               ) -> tuple[str, dict[str, Any] | None]:
    """The mode to run and the prediction the report keeps. ``auto`` assesses (or
    reuses a young assessment) and takes the decision matrix's choice; an explicit
    mode is predicted only from an assessment already stored (no delay)."""
    from vmigrate.cli.plan import plans_for, render_plan

    if mode == "auto":
        vp = run(plans_for(inv, store, [name], to, opts, max_age, AssessOptions(),
                           shutdown_timeout))[0]
        render_plan(vp, err)
        if vp.decision.chosen is None:
            raise ConflictError(f"no usable migration mode for {name}: "
                             + " ".join(vp.decision.explanation))
        return vp.decision.chosen, prediction_record(vp, vp.decision.chosen, chosen_by="auto")
    a = latest_assessment(store, name, to, max_age=max_age)
    if a is None:
        return mode, None
    vp = make_plan(inv, store, a, opts, shutdown_timeout=shutdown_timeout)
    if not vp.predictions[mode].feasible:  # type: ignore[index]
        return mode, None
    return mode, prediction_record(vp, mode, chosen_by="operator")  # type: ignore[arg-type]


def _pct(pred: float, measured: float) -> str:
    return "" if not measured else f", {100 * (pred - measured) / measured:+.0f} %"


def _prediction_rows(table: Table, r: dict[str, Any]) -> None:
    pred = r.get("prediction")
    if not pred:
        return
    f = pred["figures"]
    m = measured_figures(r)
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


def parse_cutover(text: str) -> float:
    """``HH:MM`` (today, local time), ``+SECONDS`` or epoch seconds -> epoch seconds."""
    import datetime as dt
    t = text.strip()
    try:
        if t.startswith("+"):
            return time.time() + float(t[1:])
        if ":" in t:
            hh, mm = t.split(":", 1)
            when = dt.datetime.now().replace(hour=int(hh), minute=int(mm), second=0,
                                             microsecond=0)
            return when.timestamp()
        return float(t)
    except ValueError:
        raise UserError(f"invalid --cutover {text!r}: use HH:MM, +SECONDS or an epoch "
                        "time") from None


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
        help="cold/warm: seconds the guest gets to power off after the ACPI button.")
    ] = 60.0,
    force: Annotated[bool, typer.Option(
        help="cold/warm: stop the guest hard when it did not power off in time "
        "(--no-force: fail instead, the guest runs on).")] = True,
    cutover: Annotated[str | None, typer.Option(
        help="warm: when to cut over: HH:MM (today, local time), +SECONDS, or an epoch "
        "time. Rounds go on until then. Default: as soon as a round is small.")] = None,
    target_storage: Annotated[str | None, typer.Option(
        help="online/cold/warm: the destination pool the disks go to (inventory [hosts.X.pools]); "
        "default: local.")] = None,
    target_format: Annotated[str | None, typer.Option(
        help="online/cold/warm: raw or qcow2 for the copies (default: each disk's own format).")
    ] = None,
    delete_source: Annotated[bool, typer.Option(
        "--delete-source", help="online/cold/warm: delete the source images once the VM "
        "runs on the destination (kept by default).")] = False,
    policy: Annotated[str, typer.Option(
        help="Convergence policy: balanced, minimal-downtime, postcopy, suspend, or one "
        "defined under policies in the inventory.")] = "balanced",
    downtime_ms: Annotated[int | None, typer.Option(
        help="Starting downtime limit in ms (overrides the policy's).")] = None,
    bandwidth: Annotated[str | None, typer.Option(
        help="Bandwidth cap, bytes/s (100M, 1G) or bits (800mbit).")] = None,
    parallel: Annotated[int | None, typer.Option(
        help="Parallel streams (multifd channels, >= 2). Not with post-copy.")] = None,
    compress: Annotated[str | None, typer.Option(
        help="zstd (with --parallel) or xbzrle (delta pages).")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds before the policy's timeout action (abort or complete).")] = None,
    tls: Annotated[bool, typer.Option(help="Encrypt the stream with the hosts' x509 "
                                      "credentials. --no-tls is recorded in the report.")
                   ] = True,
    max_age: Annotated[float, typer.Option(
        help="auto, and the prediction kept in the report: reuse an assessment of this "
        "route younger than this many seconds.")] = DEFAULT_MAX_AGE_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Move a running VM to another host and print the migration report.

    Exit status 0 when the migration completed, 1 when it failed or was cancelled
    (the source runs on and the destination is clean), 4 when it needs an operator,
    5 when the VM moved but the checks after the switchover failed (the guest
    crashed or rebooted on the destination, or the lab guest's memory check failed).
    """
    if mode not in ("live", "online", "cold", "warm", "auto"):
        raise UserError(f"unknown --mode {mode!r}: use auto, live, online, cold or warm")
    if mode == "live" and (target_storage or target_format or delete_source):
        raise UserError("--target-storage, --target-format and --delete-source need "
                        "--mode online, cold or warm")
    if cutover is not None and mode not in ("warm", "auto"):
        raise UserError("--cutover needs --mode warm (or auto, if it picks warm)")
    cutover_at = parse_cutover(cutover) if cutover is not None else None
    if target_format not in (None, "raw", "qcow2"):
        raise UserError(f"unknown --target-format {target_format!r}: use raw or qcow2")
    if compress not in (None, "zstd", "xbzrle"):
        raise UserError(f"unknown --compress {compress!r}: use zstd or xbzrle")
    inv = CTX.inventory()
    pol = resolve_policy(policy, load_policies(inv.policies))
    if timeout is not None:
        pol = pol.model_copy(update={"timeout_s": timeout})
    opts = MigrationOptions(
        policy=pol, downtime_ms=downtime_ms,
        bandwidth=parse_bandwidth(bandwidth) if bandwidth else None,
        parallel=parallel, compress=compress,  # type: ignore[arg-type]
        tls=tls,
    )
    store = CTX.store()
    mode, prediction = _predicted(inv, store, name, to, mode, opts, max_age, shutdown_timeout)
    with _Display(enabled=True) as display:
        storage = OnlineOptions(target_storage, target_format,  # type: ignore[arg-type]
                                delete_source)
        if mode in ("cold", "warm"):
            cls = ColdMigration if mode == "cold" else WarmMigration
            job: live.LiveMigration = cls(
                inv, store, _audit(), name, to, opts, on_progress=display, online=storage,
                disk_opts=DiskMoveOptions(
                    shutdown_timeout=shutdown_timeout, force=force,
                    bandwidth=float(opts.bandwidth) if opts.bandwidth else None,
                    cutover_at=cutover_at))
        elif mode == "online":
            job = OnlineMigration(inv, store, _audit(), name, to, opts,
                                  on_progress=display, online=storage)
        else:
            job = live.LiveMigration(inv, store, _audit(), name, to, opts,
                                     on_progress=display)
        job.report.prediction = prediction
        err.print(f"job {job.job_id}: {name} {job.report.source} -> {to} ({mode}, "
                  f"policy {pol.name})", highlight=False)
        report = run(job.run())
    data = report.model_dump(mode="json")
    if as_json:
        print_json(data)
    else:
        render_report(data)
    if report.status != "completed":
        raise typer.Exit(4 if report.status == "needs-operator" else 1)
    if report.verification.failed:
        err.print(f"error: {name} now runs on {to} but did not arrive intact: "
                  f"{report.verification.memcheck_line or report.verification.guest_crash}",
                  highlight=False)
        raise typer.Exit(5)


def _job_row(j: JobRecord) -> dict[str, Any]:
    return {"id": j.id, "vm": j.vm, "mode": j.mode, "source": j.source, "dest": j.dest,
            "phase": j.phase, "status": j.status, "error": j.error,
            "controller_alive": controller_alive(j) if j.active else None}


@job_app.command("list")
def job_list(
    active: Annotated[bool, typer.Option("--active", help="Only running jobs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List migration jobs, oldest first."""
    jobs = CTX.store().list_jobs(active=True if active else None)
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
    """Show a job and its migration report."""
    j = CTX.store().get_job(job_id)
    if as_json:
        print_json({**_job_row(j), "report": j.report})
        return
    if j.report:
        render_report({**j.report, "status": j.status, "error": j.error})
    else:
        print_json(_job_row(j))


@job_app.command("cancel")
def job_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id (a unique prefix is enough).")],
) -> None:
    """Ask a running job to cancel. Before the switchover it rolls back: the source
    runs on and the destination is cleaned."""
    j = CTX.store().request_cancel(job_id)
    out.print(f"cancel requested for job {j.id} ({j.vm}, phase {j.phase})")


@job_app.command("recover")
def job_recover(
    job_id: Annotated[str | None, typer.Argument(
        help="Job to recover (default: every running job whose controller died).")] = None,
    force: Annotated[bool, typer.Option(help="Even if its controller seems alive.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Resolve jobs left behind by a controller that died, from their saved phase."""
    store, inv, audit = CTX.store(), CTX.inventory(), _audit()
    if job_id is not None:
        jobs = [store.get_job(job_id)]
    else:
        jobs = [j for j in store.list_jobs(active=True) if not controller_alive(j)]

    async def go() -> list[Recovery]:
        return [await recover(inv, store, audit, j, force=force) for j in jobs]

    done = run(go())
    if as_json:
        print_json([r.__dict__ for r in done])
        return
    if not done:
        out.print("no abandoned jobs")
    for r in done:
        out.print(f"job {r.job} ({r.vm}, phase {r.phase}): {r.outcome}: {r.detail}")
