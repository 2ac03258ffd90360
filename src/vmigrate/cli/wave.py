"""``vmigrate wave``: plan many migrations at once (evacuate a host, rebalance, a plan
file) under the links' budgets and the hosts' capacity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.plan.fleet import STRATEGIES
from vmigrate.plan.fleet.model import fmt_rate, fmt_size
from vmigrate.plan.fleet.schedule import Strategy
from vmigrate.service.fleet import WavePlan, plan_wave

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
