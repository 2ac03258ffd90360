"""``vmigrate host ...``: the inventory's hosts: their SSH keys, state and capacity."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from vmigrate.audit import AuditLog
from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.cli.wave import (
    EXIT_INCOMPLETE,
    json_line,
    render_plan,
    run_stored_wave,
    show_report,
    start_wave,
)
from vmigrate.config import Inventory, Link, state_home
from vmigrate.errors import UserError
from vmigrate.hosts import (
    fetch_host_key,
    fingerprint,
    known_hosts_path,
    known_keys,
    record_host_key,
)
from vmigrate.service.capacity import HostUsage, fleet_usage
from vmigrate.service.fleet import plan_wave

app = typer.Typer(
    rich_markup_mode=None,
    help="The inventory's hosts: list them with their state, memory, CPU and links "
    "('host list'); record the SSH host key of a host on purpose ('host trust'). vmigrate "
    "checks every SSH host key against the inventory's host_key pin or the host's "
    "known_hosts file (default $VMIGRATE_HOME/known_hosts), never through ~/.ssh/config.",
    no_args_is_help=True,
)


@app.command()
def trust(
    host: Annotated[str, typer.Argument(help="Inventory host whose SSH key to record.",
                                        metavar="HOST")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Record it without asking.")
                   ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Fetch HOST's SSH host key, show its fingerprint and, once confirmed, record it
    as the one known key of the host's address in its known_hosts file (replacing a
    key recorded before). Compare the fingerprint with the host's own
    ('ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' on its console) before you
    confirm: this is the moment an attacker in the middle would be trusted.

    Exit status 0 when the key is recorded (or was already), 2 for a wrong request
    (unknown host, a local host, a pinned host_key, no confirmation), 1 when the
    host cannot be reached.
    """
    cfg = CTX.inventory().host(host)
    if cfg.transport == "local":
        raise UserError(f"host {host} is this machine (transport = \"local\"): no SSH key "
                        "to trust")
    if cfg.host_key is not None:
        raise UserError(f"host {host} pins its key in the inventory (host_key = "
                        f"{cfg.host_key}): change the pin there")
    path = known_hosts_path(cfg)
    key = run(fetch_host_key(cfg.address, cfg.port))
    got = fingerprint(key)
    recorded = [fingerprint(k) for k in known_keys(path, cfg.address, cfg.port)]
    result: dict[str, Any] = {
        "host": host, "address": cfg.address, "port": cfg.port,
        "key_type": key.get_algorithm(), "fingerprint": got, "known_hosts": str(path),
        "previous": recorded, "recorded": False,
    }
    if recorded == [got]:
        result["recorded"] = True
        if as_json:
            print_json({**result, "changed": False})
        else:
            out.print(f"{host} ({cfg.address}:{cfg.port}): {result['key_type']} {got} is "
                      f"already its recorded key in {path}")
        return
    where = f"{host} ({cfg.address}:{cfg.port})"
    err.print(f"{where} offers {result['key_type']} key {got}")
    if recorded:
        err.print(f"it REPLACES the key recorded for it: {', '.join(recorded)}")
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not recording the host key of {host} without a confirmation: "
                            "pass --yes once you have checked the fingerprint")
        if not typer.confirm(f"record {got} as the host key of {host} in {path}?",
                             default=False, err=True):
            raise UserError(f"the host key of {host} was not recorded")
    record_host_key(path, cfg.address, cfg.port, key)
    result["recorded"] = True
    if as_json:
        print_json({**result, "changed": True})
    else:
        out.print(f"recorded {result['key_type']} {got} for {where} in {path}")


# -- host list ------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if n >= scale:
            return f"{sign}{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return f"{sign}{n}B"


def _rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g}{unit}"
    return f"{bits:.0f}bit"


def _link_text(link: Link) -> str:
    """``h1-up 500mbit of 1gbit``: what migrations may use of the link."""
    if link.capacity is None or link.migration_rate is None:
        return f"{link.name} {link.budget:.0%} of ?"
    return f"{link.name} {_rate(link.migration_rate)} of {_rate(link.capacity)}"


def _link_dict(link: Link) -> dict[str, Any]:
    return {"name": link.name, "capacity": link.capacity, "budget": link.budget,
            "migration_rate": link.migration_rate, "declared": link.declared}


def _host_dict(inv: Inventory, usage: HostUsage) -> dict[str, Any]:
    up, down = inv.host_links(usage.host)
    return {**usage.as_dict(), "labels": inv.host(usage.host).labels,
            "uplink": _link_dict(inv.link(up)), "downlink": _link_dict(inv.link(down))}


def _ago(since: float) -> str:
    s = max(time.time() - since, 0)
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= scale:
            return f"{s / scale:.0f} {unit} ago"
    return f"{s:.0f} s ago"


@app.command("list")
def list_(
    hosts: Annotated[list[str] | None, typer.Argument(
        help="Only these inventory hosts (default: all).", metavar="HOST",
        show_default=False)] = None,
    no_measure: Annotated[bool, typer.Option(
        "--no-measure", help="Do not contact the hosts: show only what the inventory and "
        "the store say (VM sizes from their specs; CPU use and unknown capacities blank).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts (sizes in "
                                          "bytes, rates in bytes/s, CPU in CPUs).")] = False,
) -> None:
    """List the inventory's hosts: state, memory, CPU, labels and migration links.

    \b
    state    active takes VMs; draining is being emptied and takes none;
             maintenance is out of service. The inventory declares it (state =
             ...); a state an operator sets at run time is kept in the store
             and wins over it (marked 'set', with when and why below the table).
    VMs      the VMs vmigrate manages there (the store), counting stopped ones
             (they may start again) and VMs migrating in.
    memory   their guest memory (from their specs) / the host's memory (the
             inventory's memory = ..., else MemTotal read on the host: '*').
             reserve is kept for the host itself (reserve_memory = ...); free
             is what more VMs may take: total - reserve - used.
    CPU      vCPUs given to those VMs / the host's CPUs (cpus = ..., else nproc:
             '*'); busy: CPUs their QEMU processes kept busy over one second.
    links    the uplink and downlink a host's migrations leave and arrive by,
             and how much of each migrations may use: capacity x budget from
             [links.NAME] (budget default 50%: the rest is kept for the VMs' own
             traffic); '?' where the capacity is not declared.

    Measuring asks every host over SSH at once (about a second). A host that cannot
    be reached is listed with what the store knows, its error on stderr. Exit status
    0, or 2 for an unknown host.
    """
    inv = CTX.inventory()
    names = list(hosts) if hosts else list(inv.hosts)
    for name in names:
        inv.host(name)  # an unknown host: exit 2 before anything runs
    store = CTX.store()
    try:
        usages = run(fleet_usage(inv, store, names, measure=not no_measure))
    finally:
        store.close()
    if as_json:
        print_json([_host_dict(inv, u) for u in usages])
        return
    if not usages:
        out.print("no hosts in the inventory")
        return
    table = Table("host", "state", "VMs", "memory used / total", "reserve", "free",
                  "vCPUs / CPUs", "busy", "labels", "links: migrations may use")
    notes: list[str] = []
    measured_mark = False
    for u in usages:
        up, down = inv.host_links(u.host)
        state = u.state.state + (" (set)" if u.state.source == "store" else "")
        if u.state.source == "store" and u.state.since is not None:
            why = f": {u.state.reason}" if u.state.reason else ""
            notes.append(f"{u.host}: {u.state.state}, set {_ago(u.state.since)}{why}")
        gone = sum(vm.gone for vm in u.vms)
        incoming = sum(vm.incoming for vm in u.vms)
        vms = str(len(u.vms)) + "".join(
            f"\n{n} {what}" for n, what in ((gone, "stopped"), (incoming, "incoming")) if n)
        mark = "*" if u.memory_source == "measured" or u.cpus_source == "measured" else ""
        measured_mark = measured_mark or bool(mark)
        memory = f"{_size(u.memory_used)} / {_size(u.memory)}"
        memory += "*" if u.memory_source == "measured" else ""
        cpus = f"{u.vcpus} / {u.cpus if u.cpus is not None else '?'}"
        cpus += "*" if u.cpus_source == "measured" else ""
        busy = "-" if not u.measured else f"{u.cpu_measured:.2f}"
        labels = "\n".join(f"{k}={v}" for k, v in inv.host(u.host).labels.items()) or "-"
        links = f"up {_link_text(inv.link(up))}\ndown {_link_text(inv.link(down))}"
        table.add_row(u.host, state, vms, memory, _size(u.reserve_memory),
                      _size(u.memory_free), cpus, busy, labels, links)
        if u.error:
            err.print(f"{u.host}: not measured: {u.error}")
    if measured_mark:
        notes.insert(0, "* measured on the host (the inventory does not declare it)")
    out.print(table)
    for note in notes:
        out.print(note)


@app.command()
def activate(
    host: Annotated[str, typer.Argument(help="The inventory host to put back in service.",
                                        metavar="HOST", show_default=False)],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the record (kept in "
                                        "the store and the audit log).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Put HOST back in service: 'active', so waves and evacuations place VMs on it again.

    The state is kept in the store and wins over the inventory's declared state (a host
    declared 'maintenance' in vmigrate.toml is active after this, until 'vmigrate host
    maintenance' or the store's entry is changed). Written to the audit log. Exit status
    0, or 2 for an unknown host.
    """
    inv = CTX.inventory()
    inv.host(host)  # an unknown host: exit 2 before anything is written
    store = CTX.store()
    try:
        before = store.effective_host_state(host, inv.declared_state(host))
        rec = store.set_host_state(host, "active", reason)
    finally:
        store.close()
    AuditLog(state_home() / "audit.jsonl").append(
        "host.state", {"host": host, "state": "active", "was": before.state,
                       "reason": reason})
    if as_json:
        print_json({"host": host, "state": rec.state, "was": before.state,
                    "since": rec.since, "reason": rec.reason})
        return
    out.print(f"{host}: active (was {before.state})")


@app.command()
def maintenance(
    host: Annotated[str, typer.Argument(help="The inventory host to empty and take out of "
                                        "service.", metavar="HOST", show_default=False)],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the evacuation plan ('wave plan --evacuate HOST') and "
        "change nothing.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the record (kept in "
                                        "the store and the audit log).")] = "",
    retries: Annotated[int, typer.Option("--retries", min=0, max=10, help="Attempts after "
                                         "the first for a migration that fails.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Events and the report as JSON "
                                          "lines (with --dry-run: the plan).")] = False,
) -> None:
    """Empty HOST and put it in maintenance, now, without asking.

    \b
    1. HOST is marked 'draining': no wave places VMs on it from now on.
    2. Every VM vmigrate manages on it is moved by an evacuation wave ('vmigrate wave
       run --evacuate HOST'): destinations by capacity and topology, spread over the
       active hosts, each VM by its tier's rules, the links within their budgets.
    3. Once the store has no VM left on HOST it is marked 'maintenance'. If one could
       not move, HOST stays 'draining' and the VMs left are named.

    The wave is kept in the store: if this process dies, 'vmigrate wave resume ID' goes
    on, and running 'host maintenance HOST' again plans the VMs still there. 'vmigrate
    host activate HOST' puts it back in service. Exit status 0 when HOST is empty and in
    maintenance; 10 when VMs are left on it (named); 2 for an unknown host.
    """
    inv = CTX.inventory()
    inv.host(host)  # an unknown host: exit 2 before anything is written
    store = CTX.store()
    audit = AuditLog(state_home() / "audit.jsonl")
    report: dict[str, Any] | None = None
    unplaceable: list[tuple[str, str]] = []
    try:
        if dry_run:
            plan = run(plan_wave(inv, store, evacuate=host))
            if as_json:
                print_json({**plan.to_json(), "dry_run": True})
            else:
                render_plan(plan, plan.baseline("sequential").makespan_s
                            if plan.placement.moves else None)
            return
        before = store.effective_host_state(host, inv.declared_state(host))
        store.set_host_state(host, "draining", reason)
        audit.append("host.state", {"host": host, "state": "draining", "was": before.state,
                                    "reason": reason})
        if not as_json:
            err.print(f"{host}: draining (was {before.state})", highlight=False)
        plan = run(plan_wave(inv, store, evacuate=host))
        unplaceable = list(plan.placement.unplaceable) + list(plan.schedule.refused)
        if plan.schedule.entries:
            wave = start_wave(plan, store, {})
            if not as_json:
                err.print(f"wave {wave}: {len(plan.schedule.entries)} migration(s) "
                          f"(resume with 'vmigrate wave resume {wave}')", highlight=False)
            report = run_stored_wave(inv, store, wave, resume=False, as_json=as_json,
                                     retries=retries)
        left = sorted(v.name for v in store.list_vms() if v.host == host)
        if not left:
            store.set_host_state(host, "maintenance", reason)
            audit.append("host.state", {"host": host, "state": "maintenance",
                                        "was": "draining", "reason": reason})
    finally:
        store.close()
    if report is not None:
        show_report(report, unplaceable, as_json)  # the host's own state decides below
    if left:
        err.print(f"{host} stays draining: {len(left)} VM(s) still on it: "
                  f"{', '.join(left)}", highlight=False)
        if as_json:
            json_line({"event": "host", "host": host, "state": "draining", "left": left})
        raise typer.Exit(EXIT_INCOMPLETE)
    if as_json:
        json_line({"event": "host", "host": host, "state": "maintenance", "left": []})
    else:
        out.print(f"{host}: maintenance (empty)")
