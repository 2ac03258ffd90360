"""``vmigrate wave``: plan many migrations at once (evacuate a host, rebalance, a plan
file) under the links' budgets and the hosts' capacity."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vmigrate.audit import AuditLog
from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.config import Inventory, state_home
from vmigrate.fleet import WaveRunner, store_wave
from vmigrate.fleet.run import wave_report
from vmigrate.plan.fleet import STRATEGIES
from vmigrate.plan.fleet.model import fmt_rate, fmt_size
from vmigrate.plan.fleet.schedule import Strategy
from vmigrate.progress import ProgressFn
from vmigrate.service.fleet import WavePlan, plan_wave
from vmigrate.service.migrations import MigrationService
from vmigrate.store import Store

#: exit status of a wave that ended with VMs not moved (failed, unplaceable, or
#: waiting for an operator): the others were moved
EXIT_INCOMPLETE = 10

app = typer.Typer(no_args_is_help=True, help="Plan and run waves of migrations.")


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def render_plan(plan: WavePlan, sequential_s: float | None) -> None:
    """The plan as a table for people, with the wave's ETA and why."""
    sched, placement = plan.schedule, plan.placement
    out.print(placement.summary)
    table = Table("VM", "from -> to", "mode", "start", "end", "bandwidth", "time",
                  "downtime", "bytes", "why")
    fleet = plan.view.fleet
    for e in sorted(sched.entries, key=lambda e: (e.start_s, e.vm)):
        bw = max((r for _, r in e.allocations), default=0.0)
        table.add_row(
            e.vm, f"{e.src} -> {e.dst}", fleet.vm(e.vm).mode, f"{e.start_s:.0f} s",
            f"{e.end_s:.0f} s" if e.status == "completed" else "fails",
            fmt_rate(bw), _duration(e.end_s - e.start_s),
            f"{e.downtime_ms:.0f} ms", fmt_size(e.estimate.bytes),
            placement.why.get(e.vm, "") + ("\n" + e.why if e.why else ""))
    out.print(table)
    out.print(f"wave ETA: {_duration(sched.makespan_s)} (predicted); downtime: sum "
              f"{sched.downtime_sum_ms:.0f} ms, longest {sched.downtime_max_ms:.0f} ms")
    if sequential_s:
        out.print(f"one at a time (each with its lane's budget) it would take "
                  f"{_duration(sequential_s)}: {sched.makespan_s / sequential_s:.2f}x")
    if sched.critical_path:
        out.print(f"critical path: {' -> '.join(sched.critical_path)}"
                  + (f" ({sched.critical_why})" if sched.critical_why else ""))
    for vm, reason in list(placement.unplaceable) + list(sched.refused):
        err.print(f"[bold red]{vm} cannot move[/]: {reason}")
    for note in list(plan.view.notes) + list(sched.notes):
        out.print(f"note: {note}")
    out.print("dry run: nothing was changed")


@app.command("plan")
def plan_cmd(
    plan_file: Annotated[Path | None, typer.Argument(
        help="A plan file (TOML): [[move]] entries with vm = \"NAME\" and optionally "
        "to = \"HOST\" (without it the VM is placed by capacity).", metavar="[PLAN_FILE]",
        show_default=False)] = None,
    evacuate: Annotated[str | None, typer.Option(
        "--evacuate", metavar="HOST", help="Plan moving every VM off HOST.")] = None,
    rebalance: Annotated[bool, typer.Option(
        "--rebalance", help="Plan moves that even out memory and CPU use across the "
        "active hosts, where the gain is worth the move.")] = False,
    max_moves: Annotated[int, typer.Option(
        "--max-moves", min=0, max=1000, help="--rebalance: at most this many moves.")] = 5,
    strategy: Annotated[str, typer.Option(
        "--strategy", help="The scheduler: vmigrate (default; link budgets, caps, "
        "admission by the models) or, for comparison, sequential, all-at-once, kubevirt, "
        "proxmox.")] = "vmigrate",
    no_measure: Annotated[bool, typer.Option(
        "--no-measure", help="Do not contact the hosts: capacities as declared, VM CPU "
        "use from their vCPUs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts (bytes, "
                                          "bytes/s, seconds).")] = False,
) -> None:
    """Plan a wave of migrations and print it; nothing is changed (a dry run).

    \b
    Give one of: a PLAN_FILE, --evacuate HOST, --rebalance.

    For every VM: where it goes (and why there), the mode, when it starts and ends by
    the models, the bandwidth it gets on its links, its predicted time, downtime and
    bytes. Then the whole wave's ETA, its critical path, and what cannot move and why.

    Each migration crosses its source's uplink and its destination's downlink; the sum
    on every link stays within the link's budget ([links.NAME] capacity x budget in the
    inventory), hosts take at most max_migrations_in/out at once, a destination never
    holds more than its memory (less its reserve) counting migrations in flight, and
    'apart' groups never share a host. VM dirty rates come from 'vmigrate assess'
    (a VM never assessed is taken as idle; the notes say so).

    Exit status 0 when the plan was made (even with VMs that cannot move: they are
    listed on stderr and under "unplaceable" with --json), 2 for bad input.
    """
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    strat: Strategy = strategy
    inv = CTX.inventory()
    store = CTX.store()
    try:
        plan = run(plan_wave(inv, store, evacuate=evacuate, rebalance=rebalance,
                             plan_file=plan_file, max_moves=max_moves,
                             measure=not no_measure, strategy=strat))
    finally:
        store.close()
    sequential_s: float | None = None
    if strat != "sequential" and plan.placement.moves:
        sequential_s = plan.baseline("sequential").makespan_s
    if as_json:
        print_json({**plan.to_json(), "sequential_makespan_s": sequential_s,
                    "dry_run": True})
        return
    render_plan(plan, sequential_s)


# -- running ------------------------------------------------------------------------------


def json_line(data: dict[str, Any]) -> None:
    """One JSON object on one line of stdout (``--json`` of a running wave: events,
    then the report)."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


class _Display:
    """Events as lines for people (stderr), or as JSON lines for scripts (stdout)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.t0 = time.monotonic()
        self._last: dict[str, float] = {}

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.as_json:
            if ev.get("event") != "wave" or "report" not in ev:
                json_line(ev)
            return
        at = f"{time.monotonic() - self.t0:6.0f} s"
        kind = ev.get("event")
        if kind == "move":
            state = ev.get("state")
            extra = ""
            if state == "started" and ev.get("bandwidth"):
                extra = f", capped at {fmt_rate(float(ev['bandwidth']))}"
            if ev.get("error"):
                extra += f": {ev['error']}"
            if state == "retry":
                extra += f" (again in {ev.get('delay_s', 0):.0f} s)"
            err.print(f"{at}  {ev.get('vm')} {ev.get('src')} -> {ev.get('dst')} "
                      f"({ev.get('mode')}): {state}{extra}", highlight=False)
        elif kind == "progress":
            vm = str(ev.get("vm"))
            now = time.monotonic()
            if now - self._last.get(vm, 0.0) < 5.0:
                return
            self._last[vm] = now
            total = ev.get("total") or 0
            done = ev.get("bytes") or 0
            pct = f"{100 * done / total:.0f} %" if total else fmt_size(done)
            bw = ev.get("bandwidth")
            eta = ev.get("eta_s")
            err.print(f"{at}  {vm}: {ev.get('phase')} {pct}"
                      + (f", {fmt_rate(float(bw))}" if bw else "")
                      + (f", {eta:.0f} s left" if eta is not None else ""), highlight=False)
        elif kind == "eta" and ev.get("eta_s") is not None:
            err.print(f"{at}  wave: about {_duration(float(ev['eta_s']))} left",
                      highlight=False)
        elif kind == "wave" and "report" not in ev:
            err.print(f"{at}  wave {ev.get('wave')}: {ev.get('state')}"
                      + (f", ETA {_duration(float(ev['eta_s']))}" if ev.get("eta_s") else ""),
                      highlight=False)


def render_report(report: dict[str, Any]) -> None:
    """The final table per VM (predicted against measured) and the wave's figures."""
    table = Table("VM", "from -> to", "mode", "state", "tries", "time (pred.)",
                  "downtime ms (pred.)", "bytes (pred.)", "error")

    def fig(d: dict[str, Any] | None, key: str, fmt: str) -> str:
        v = (d or {}).get(key)
        return "-" if v is None else format(v, fmt)

    for m in report.get("moves", []):
        meas, pred = m.get("measured") or {}, m.get("predicted") or {}
        table.add_row(
            m["vm"], f"{m['src']} -> {m['dst']}", m["mode"], m["state"], str(m["attempts"]),
            f"{fig(meas, 'time_s', '.1f')} ({fig(pred, 'time_s', '.1f')})",
            f"{fig(meas, 'downtime_ms', '.0f')} ({fig(pred, 'downtime_ms', '.0f')})",
            f"{fmt_size(meas['bytes']) if meas.get('bytes') else '-'} "
            f"({fmt_size(pred['bytes']) if pred.get('bytes') else '-'})",
            m.get("error") or "")
    out.print(table)
    elapsed, eta = report.get("elapsed_s"), report.get("planned_eta_s")
    line = f"wave {report.get('wave')} ({report.get('kind')}): {report.get('state')}"
    if elapsed is not None:
        line += f" in {_duration(float(elapsed))}"
    if eta:
        line += f", planned {_duration(float(eta))}"
    out.print(line)
    for note in report.get("notes", []):
        out.print(f"note: {note}")


def run_stored_wave(inv: Inventory, store: Store, wave: int, *, resume: bool,
                    as_json: bool, retries: int = 2) -> dict[str, Any]:
    """Run (or resume) stored wave ``wave`` with a live display; its report."""
    audit = AuditLog(state_home() / "audit.jsonl")

    def services(progress: ProgressFn) -> MigrationService:
        return MigrationService(inv, store, audit, progress=progress)

    runner = WaveRunner(store, audit, services, on_event=_Display(as_json), retries=retries)
    return run(runner.resume(wave) if resume else runner.run(wave))


def show_report(report: dict[str, Any], unplaceable: list[tuple[str, str]],
                as_json: bool) -> bool:
    """Print the report; whether every VM moved."""
    if as_json:
        json_line({"event": "report", **report,
                   "unplaceable": [{"vm": vm, "reason": r} for vm, r in unplaceable]})
    else:
        render_report(report)
        for vm, reason in unplaceable:
            err.print(f"[bold red]{vm} was not moved[/]: {reason}")
    return report.get("state") == "done" and not unplaceable


def finish(report: dict[str, Any], unplaceable: list[tuple[str, str]], as_json: bool) -> None:
    """Print the report and exit with the wave's status (0: every VM moved)."""
    if not show_report(report, unplaceable, as_json):
        raise typer.Exit(EXIT_INCOMPLETE)


def start_wave(plan: WavePlan, store: Store, options: dict[str, Any]) -> int:
    """Keep a planned wave in the store; its id."""
    fleet = plan.view.fleet
    modes = {m.vm: fleet.vm(m.vm).mode for m in plan.placement.moves}
    rec = store_wave(store, plan.schedule, kind=plan.kind, host=plan.host, modes=modes,
                     options=options)
    return rec.id


@app.command("run")
def run_cmd(
    plan_file: Annotated[Path | None, typer.Argument(
        help="A plan file, as for 'wave plan'.", metavar="[PLAN_FILE]",
        show_default=False)] = None,
    evacuate: Annotated[str | None, typer.Option(
        "--evacuate", metavar="HOST", help="Move every VM off HOST (see also 'vmigrate "
        "host maintenance', which also marks the host).")] = None,
    rebalance: Annotated[bool, typer.Option("--rebalance", help="Even out the hosts.")
                         ] = False,
    max_moves: Annotated[int, typer.Option("--max-moves", min=0, max=1000,
                                           help="--rebalance: at most this many moves.")] = 5,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="The convergence policy of every live migration (default: "
        "the default policy, adaptive).")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, max=10, help="Attempts after "
                                         "the first for a migration that fails.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON lines, "
                                          "then the report (one JSON object per line).")
                       ] = False,
) -> None:
    """Plan a wave (as 'wave plan') and run it now: the migrations start in the plan's
    order, several at once, each capped at its bandwidth so every link stays within its
    budget.

    The wave and each migration's place in it are kept in the store before anything
    starts: if this process dies, 'vmigrate wave resume ID' goes on from where it was
    and migrates no VM twice. A migration that fails is tried again (--retries, after
    5 s then 20 s), then left on its source and named; the others go on.

    Progress goes to stderr (with --json, events to stdout). At the end a table per VM:
    state, attempts, time, downtime and bytes measured (predicted in brackets).

    Exit status 0 when every VM moved; 10 when some did not (failed, could not be
    placed, or wait for an operator: named); 2 for bad input, before anything starts.
    """
    inv = CTX.inventory()
    store = CTX.store()
    try:
        plan = run(plan_wave(inv, store, evacuate=evacuate, rebalance=rebalance,
                             plan_file=plan_file, max_moves=max_moves))
        unplaceable = list(plan.placement.unplaceable) + list(plan.schedule.refused)
        if not plan.schedule.entries:
            if not as_json:
                render_plan(plan, None)
            finish({"state": "done", "moves": [], "wave": None, "kind": plan.kind},
                   unplaceable, as_json)
            return
        options: dict[str, Any] = {"policy": policy} if policy else {}
        wave = start_wave(plan, store, options)
        if not as_json:
            err.print(f"wave {wave}: {len(plan.schedule.entries)} migration(s), ETA "
                      f"{_duration(plan.schedule.makespan_s)} (resume with 'vmigrate wave "
                      f"resume {wave}')", highlight=False)
        report = run_stored_wave(inv, store, wave, resume=False, as_json=as_json,
                                 retries=retries)
    finally:
        store.close()
    finish(report, unplaceable, as_json)


@app.command("resume")
def resume_cmd(
    wave: Annotated[int, typer.Argument(help="The wave's id ('vmigrate wave list').",
                                        metavar="WAVE", show_default=False)],
    retries: Annotated[int, typer.Option("--retries", min=0, max=10, help="Attempts after "
                                         "the first for a migration that fails.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Events and the report as JSON "
                                          "lines.")] = False,
) -> None:
    """Go on with a wave whose controller died (or that ended with failed migrations).

    Migrations it had started are settled first from their jobs (completed: done;
    rolled back: tried again; waiting for an operator: named); VMs already moved are
    never moved again. Exit status as 'wave run'.
    """
    inv = CTX.inventory()
    store = CTX.store()
    try:
        store.get_wave(wave)  # an unknown wave: exit 2 before anything runs
        report = run_stored_wave(inv, store, wave, resume=True, as_json=as_json,
                                 retries=retries)
    finally:
        store.close()
    finish(report, [], as_json)


@app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the waves in the store: id, kind, state, moves done and their ETA."""
    store = CTX.store()
    try:
        rows = [(w, store.wave_moves(w.id)) for w in store.list_waves()]
    finally:
        store.close()
    data: list[dict[str, Any]] = [{"id": w.id, "kind": w.kind, "host": w.host, "state": w.state,
             "created": w.created, "eta_s": w.eta_s, "moves": len(ms),
             "done": sum(m.state == "done" for m in ms),
             "failed": sum(m.state == "failed" for m in ms)} for w, ms in rows]
    if as_json:
        print_json(data)
        return
    table = Table("wave", "kind", "state", "moves", "done", "failed", "ETA")
    for d in data:
        table.add_row(str(d["id"]), d["kind"] + (f" {d['host']}" if d["host"] else ""),
                      d["state"], str(d["moves"]), str(d["done"]), str(d["failed"]),
                      _duration(d["eta_s"]) if d["eta_s"] else "-")
    out.print(table)


@app.command("show")
def show_cmd(
    wave: Annotated[int, typer.Argument(help="The wave's id.", metavar="WAVE",
                                        show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a wave: each migration's state, and the report once it ended."""
    store = CTX.store()
    try:
        w = store.get_wave(wave)
        moves = store.wave_moves(wave)
    finally:
        store.close()
    report = w.report or wave_report(w, moves)
    if as_json:
        print_json(report)
        return
    render_report(report)
