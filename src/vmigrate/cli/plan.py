"""``vmigrate assess`` and ``vmigrate plan``: measure, predict, decide."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vmigrate.cli._common import CTX, err, non_negative, out, positive, print_json, run
from vmigrate.config import Inventory
from vmigrate.errors import UserError
from vmigrate.plan.assessment import Assessment, DirtyWindow
from vmigrate.plan.capabilities import MigrationOptions
from vmigrate.plan.policy import DEFAULT_POLICY, load_policies, parse_bandwidth, resolve_policy
from vmigrate.plan.window import WindowAdvice, best_window
from vmigrate.progress import lines
from vmigrate.service.assess import AssessOptions, Assessor
from vmigrate.service.planning import (
    DEFAULT_MAX_AGE_S,
    VmPlan,
    latest_assessment,
    make_plan,
    planning_config,
)
from vmigrate.store import Store

MiB = 1 << 20
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WindowsOpt = Annotated[int, typer.Option(
    "--windows", help="Dirty-rate windows to sample (calc-dirty-rate).")]
WindowSOpt = Annotated[int, typer.Option(
    "--window-seconds", help="Length of each dirty-rate window, whole seconds.")]
ProbeOpt = Annotated[float, typer.Option(
    "--probe-seconds", help="How long the link probe runs (0: skip it).")]


def _mib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:,.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):,.2f} GiB"


def _rate(n: float) -> str:
    return f"{n / MiB:,.1f} MiB/s"


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _note(line: str) -> None:
    err.print(f"  {line}", highlight=False)


def render_assessment(a: Assessment) -> None:
    table = Table(title=f"assessment of {a.vm} on {a.host} ({_when(a.at)})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", "running" if a.running else "not running (sizes only)")
    table.add_row("memory", f"{_mib(a.memory_bytes)}, {a.vcpus} vCPU"
                  + (f", CPU {a.cpu_pct:.0f} %" if a.running else ""))
    if a.dirty:
        lens = ", ".join(f"{w.seconds:g} s" for w in a.dirty)
        line = (f"{_rate(a.dirty_rate)} mean, {_rate(a.dirty_peak)} peak over "
                f"{len(a.dirty)} windows ({lens})")
        if a.dirty_set_bytes is not None:
            line += f"; writable set about {_mib(a.dirty_set_bytes)}"
        table.add_row("dirty rate", line)
    for d in a.disks:
        travel = ("not sampled" if d.compress_ratio is None
                  else f"{d.compress_ratio:.2f} of it goes on the wire")
        table.add_row(d.device, f"{d.path} ({d.format}): {_mib(d.virtual_bytes)} virtual, "
                      f"{_mib(d.allocated_bytes)} allocated ({travel}), writes "
                      f"{_rate(d.write_rate)}" + (", visible on the destination (shared)"
                                                  if d.shared else ""))
    if a.link is not None:
        table.add_row(f"link {a.link.source} -> {a.link.dest}",
                      f"{a.link.bandwidth * 8 / 1e6:,.0f} Mbit/s ({_rate(a.link.bandwidth)}), "
                      f"connect {a.link.rtt_ms:.1f} ms")
        table.add_row("TLS", "both hosts hold QEMU TLS credentials" if a.tls
                      else "missing on a host: live/online would run in clear")
    out.print(table)


def _options(inv: Inventory, policy: str, bandwidth: str | None) -> MigrationOptions:
    pol = resolve_policy(policy, load_policies(inv.policies))
    return MigrationOptions(policy=pol, bandwidth=parse_bandwidth(bandwidth) if bandwidth
                            else None)


def assess(
    names: Annotated[list[str], typer.Argument(help="VMs to assess.", metavar="NAME...")],
    to: Annotated[str | None, typer.Option(
        "--to", help="Destination host: also probe the migration link to it.")] = None,
    windows: WindowsOpt = 3,
    window_seconds: WindowSOpt = 1,
    long_window: Annotated[int, typer.Option(
        help="One longer window (seconds, 0: none) that shows whether the guest only "
        "rewrites a bounded set of pages.")] = 4,
    probe_seconds: ProbeOpt = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Measure what migrating VMs would have to move: memory and its dirty rate,
    disks (sizes, write rate, how well the data compresses, shared or not), CPU
    use and, with --to, the migration link's usable bandwidth. Every assessment
    is stored, so history accumulates for predictions and 'plan --window'.

    Takes about windows x window-seconds + long-window + probe-seconds per VM.
    """
    opts = AssessOptions(windows=windows, window_s=window_seconds, long_window_s=long_window,
                         probe_s=probe_seconds if to else 0.0)
    opts.check()
    inv, store = CTX.inventory(), CTX.store()

    async def go() -> list[Assessment]:
        async with Assessor(inv, store, progress=lines(_note)) as assessor:
            return [await assessor.assess(n, dest=to, opts=opts) for n in names]

    done = run(go())
    if as_json:
        print_json([a.model_dump(mode="json") for a in done])
        return
    for a in done:
        render_assessment(a)


def _fmt_s(s: float) -> str:
    return f"{s:,.1f} s" if s < 600 else f"{s / 60:,.1f} min"


def _fmt_ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms < 10_000 else f"{ms / 1000:,.1f} s"


def render_plan(p: VmPlan, console: Console = out) -> None:
    d = p.decision
    a = p.assessment
    dest = a.link.dest if a.link else "?"
    title = f"plan for {a.vm}: {a.host} -> {dest}" + (f" (tier {d.tier})" if d.tier else "")
    table = Table("mode", "total time", "downtime", "on the wire", "post-copy", "score",
                  "note", title=title)
    for row in d.rows:
        pred = p.predictions[row.mode]
        f = pred.figures
        mark = " *" if row.mode == d.chosen else ""
        unc = f" ±{pred.uncertainty:.0%}" if pred.uncertainty is not None and f else ""
        note = "" if row.candidate else (row.reason or "")
        table.add_row(
            f"[bold]{row.mode}{mark}[/]" if mark else row.mode,
            (_fmt_s(f.total_time_s) + unc) if f else "-",
            _fmt_ms(f.downtime_ms) if f else "-",
            _mib(f.wire_bytes) if f else "-",
            ("yes" if pred.postcopy else "no") if f else "-",
            f"{row.total:.2f}" if row.total is not None else "-",
            note)
    console.print(table)
    for line in d.explanation:
        console.print(f"  {line}")


async def plans_for(inv: Inventory, store: Store, names: list[str], to: str,
                 opts: MigrationOptions, max_age: float, aopts: AssessOptions,
                 shutdown_timeout: float) -> list[VmPlan]:
    config = planning_config(inv)  # a bad [planning] fails before any measuring
    plans = []
    async with Assessor(inv, store, progress=lines(_note)) as assessor:
        for name in names:
            a = latest_assessment(store, name, to, max_age=max_age)
            if a is None:
                _note(f"{name}: assessing (no assessment of the route younger than "
                      f"{max_age:g} s)")
                a = await assessor.assess(name, dest=to, opts=aopts)
            else:
                _note(f"{name}: using the assessment of {_when(a.at)}")
            plans.append(make_plan(inv, store, a, opts, shutdown_timeout=shutdown_timeout,
                                   config=config))
    return plans


def window_advice(store: Store, name: str, to: str | None, opts: MigrationOptions
                  ) -> tuple[WindowAdvice, str]:
    """Best window for one VM from its stored history; the second item says what the
    cost is."""
    hist = [Assessment.model_validate(r) for r in store.list_assessments(name)]
    with_link = [a for a in hist if a.link is not None and (to is None or a.link.dest == to)]
    from vmigrate.plan.predict import predict

    if with_link:
        base = with_link[-1]

        def cost(rate: float) -> float:
            a = base.model_copy(update={"dirty": (DirtyWindow(seconds=1, rate=rate),)})
            preds = predict(a, policy=opts.policy, bandwidth=opts.bandwidth)
            times = [p.figures.total_time_s for p in preds.values() if p.figures is not None
                     and p.mode in ("live", "online")]
            return min(times) if times else rate
        what = (f"predicted live/online migration time over the link "
                f"{base.link.source} -> {base.link.dest}" if base.link else "")
    else:
        def cost(rate: float) -> float:
            return rate
        what = "dirty rate (no link measured yet: assess with --to for time predictions)"
    offset = time.localtime().tm_gmtoff
    return best_window(hist, cost, utc_offset_s=offset), what


def plan(
    names: Annotated[list[str], typer.Argument(help="VMs to plan.", metavar="NAME...")],
    to: Annotated[str | None, typer.Option("--to", help="Destination host.")] = None,
    window: Annotated[bool, typer.Option(
        "--window", help="Instead: the time of day with the lowest predicted dirty rate "
        "and migration cost, from the stored assessment history.")] = False,
    policy: Annotated[str, typer.Option(help="Convergence policy for live/online.")
                      ] = DEFAULT_POLICY,
    bandwidth: Annotated[str | None, typer.Option(
        help="Bandwidth cap the migration would run under (100M, 800mbit).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        help="cold/warm: seconds the guest gets to power off.", callback=positive)] = 60.0,
    max_age: Annotated[float, typer.Option(
        help="Reuse a stored assessment of the route younger than this many seconds; "
        "otherwise assess now.", callback=non_negative)] = DEFAULT_MAX_AGE_S,
    windows: WindowsOpt = 3,
    window_seconds: WindowSOpt = 1,
    probe_seconds: ProbeOpt = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Predict, for each VM and every mode (live, online, cold, warm), the total
    time, the guest's downtime, the bytes on the wire and whether post-copy will be
    needed; score the modes with the weighted decision matrix ([planning] and
    [tiers] in the inventory) and say which one to use and why.

    Exit status 0 when every VM has a usable mode, 1 when one has none.
    """
    inv, store = CTX.inventory(), CTX.store()
    opts = _options(inv, policy, bandwidth)
    if window:
        advices = []
        for name in names:
            store.get_vm(name)
            advice, what = window_advice(store, name, to, opts)
            advices.append({"vm": name, "cost": what, **advice.model_dump(mode="json")})
            if not as_json:
                out.print(f"[bold]{name}[/]: best window by {what}")
                for line in advice.message:
                    out.print(f"  {line}")
        if as_json:
            print_json(advices)
        return
    if to is None:
        raise UserError("give --to HOST (the destination to plan for), or --window")
    if max_age < 0:
        raise UserError("--max-age must be >= 0")
    if probe_seconds <= 0:
        raise UserError("plan needs the link measured: --probe-seconds must be above 0")
    aopts = AssessOptions(windows=windows, window_s=window_seconds, probe_s=probe_seconds)
    aopts.check()
    plans = run(plans_for(inv, store, names, to, opts, max_age, aopts, shutdown_timeout))
    if as_json:
        print_json([p.as_dict() for p in plans])
    else:
        for p in plans:
            render_plan(p)
    stuck = [p.assessment.vm for p in plans if p.decision.chosen is None]
    if stuck:
        err.print(f"error: no usable mode for {', '.join(stuck)} (see the explanation)",
                  highlight=False)
        raise typer.Exit(1)

