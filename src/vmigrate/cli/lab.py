"""``vmigrate lab ...``: the embedded testbed datacenter."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vmigrate.cli._common import err, out, positive, print_json
from vmigrate.config import state_home
from vmigrate.progress import lines

if TYPE_CHECKING:
    from vmigrate.lab._plan import Direction
    from vmigrate.lab.traffic import LinkSampler

app = typer.Typer(
    rich_markup_mode=None,
    help="Build and tear down a small datacenter on this machine (needs root): hosts are "
    "network namespaces with their own sshd, linked by shaped migration links. Each host's "
    "link has an uplink (what the host sends) and a downlink (what it receives), each with "
    "its own rate.",
    no_args_is_help=True,
)


def _say(msg: str) -> None:
    err.print(f"[dim]· {msg}[/]")


_progress = lines(_say)


@app.command()
def up(
    hosts: Annotated[int, typer.Option(help="Number of hosts (1-8).")] = 2,
    link_rate: Annotated[
        str, typer.Option(help="Migration link rate of every host, both directions, tc "
                          "syntax: 200mbit, 1gbit.")
    ] = "1gbit",
    uplink: Annotated[list[str] | None, typer.Option(
        metavar="HOST=RATE",
        help="Rate of one host's uplink (what it sends to the others), instead of "
        "--link-rate; repeat for more hosts: --uplink h1=1gbit --uplink h2=500mbit.")] = None,
    downlink: Annotated[list[str] | None, typer.Option(
        metavar="HOST=RATE",
        help="Rate of one host's downlink (what it receives from the others), instead of "
        "--link-rate; repeat for more hosts: --downlink h2=200mbit.")] = None,
    name: Annotated[str, typer.Option(help="Lab name: a letter then up to 5 letters/digits.")
                    ] = "vml",
    as_json: Annotated[bool, typer.Option("--json", help="Print the inventory as JSON.")] = False,
) -> None:
    """Build the lab and write its inventory to $VMIGRATE_HOME/vmigrate.toml.

    Hosts are named h1, h2, ... Traffic from h1 to h2 crosses h1's uplink and h2's
    downlink, so it runs at the slower of the two.
    """
    from vmigrate.lab._plan import parse_host_rates
    from vmigrate.lab.net import LabSpec, lab_up

    spec = LabSpec(name=name, hosts=hosts, link_rate=link_rate,
                   uplinks=parse_host_rates(uplink or [], "--uplink"),
                   downlinks=parse_host_rates(downlink or [], "--downlink"))
    inv = lab_up(spec, state_home(), progress=_progress)
    if as_json:
        print_json(inv.model_dump(mode="json"))
        return
    table = Table("host", "ssh address", "migration address", "data dir")
    for h in inv.hosts.values():
        table.add_row(h.name, h.address, h.migration_address or "-", str(h.data_dir))
    out.print(table)
    if inv.lab:
        out.print(f"lab [bold]{inv.lab.name}[/] is up; VM network {inv.lab.vm_network}, "
                  f"probe namespace {inv.lab.probe_netns}; inventory {inv.path or ''}")


@app.command()
def down(
    name: Annotated[str | None, typer.Option(help="Lab name (default: the inventory's lab).")
                    ] = None,
) -> None:
    """Remove everything the lab created: VMs, sshd, namespaces, links, files. Safe to rerun."""
    from vmigrate.lab.net import lab_down

    removed = lab_down(state_home(), name, progress=_progress)
    out.print(f"lab removed ({len(removed)} resources)" if removed else "no lab was up")


@app.command()
def status(
    name: Annotated[str | None, typer.Option(help="Lab name (default: the inventory's lab).")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show the lab's hosts, their sshd and QEMU processes, and link rates (as tc reports
    them now: up = what the host sends, down = what it receives)."""
    from vmigrate.lab.net import lab_status

    st = lab_status(state_home(), name)
    if as_json:
        data = dataclasses.asdict(st)
        data["healthy"] = st.healthy
        print_json(data)
        return
    health = "[green]healthy[/]" if st.healthy else "[red]degraded[/]"
    out.print(f"lab [bold]{st.name}[/] ({st.phase}, {health}): index {st.index}, "
              f"links {st.link_rate}, VM network {st.vm_network}, "
              f"probe {st.probe_netns} {st.probe_address}")
    table = Table("host", "namespace", "sshd", "ssh address", "migration address",
                  "link (up / down)", "QEMU pids")
    for h in st.hosts:
        table.add_row(
            h.host,
            h.netns if h.netns_present else f"[red]{h.netns} missing[/]",
            f"pid {h.sshd_pid}" if h.sshd_alive else "[red]down[/]",
            h.mgmt_address,
            h.migration_address,
            f"{h.uplink_rate or '?'} / {h.downlink_rate or '?'} "
            f"{'' if h.link_up else '[red]cut[/]'}".rstrip(),
            " ".join(map(str, h.qemu_pids)) or "-",
        )
    out.print(table)


@app.command()
def link(
    host: Annotated[str | None, typer.Argument(
        metavar="HOST", help="Lab host (h1, h2, ...); omit to show every host's link.")] = None,
    rate: Annotated[str | None, typer.Option(
        metavar="RATE", help="New rate for both directions, tc syntax: 200mbit, 1gbit.")] = None,
    up: Annotated[str | None, typer.Option(
        "--up", metavar="RATE", help="New uplink rate: what the host sends to the others.")] = None,
    down: Annotated[str | None, typer.Option(
        "--down", metavar="RATE",
        help="New downlink rate: what the host receives from the others.")] = None,
    name: Annotated[str | None, typer.Option(help="Lab name (default: the inventory's lab).")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show or change the rate of a host's migration link on a running lab.

    Each host's link has two directions: up (host -> the others) and down (the others
    -> host). Examples: 'vmigrate lab link' shows every link; 'vmigrate lab link h2
    --down 200mbit' slows what h2 receives; 'vmigrate lab link h1 --rate 1gbit' sets
    both directions. The change takes effect at once, on traffic already flowing too.
    """
    from vmigrate.lab._plan import parse_rate
    from vmigrate.lab.links import LinkDirection, set_link_rate
    from vmigrate.lab.net import find_host, find_lab

    if rate is not None and (up is not None or down is not None):
        raise typer.BadParameter("give --rate (both directions) or --up/--down, not both")
    wanted: list[tuple[str | None, LinkDirection]] = [(rate, "both"), (up, "up"), (down, "down")]
    changes = [(r, d) for r, d in wanted if r is not None]
    if changes and host is None:
        raise typer.BadParameter("name the host whose link to change, e.g. 'lab link h2 "
                                 "--down 200mbit'")
    home = state_home()
    if host is not None:
        find_host(home, host, name)  # NotFoundError (naming the lab's hosts) before any change
        for new, _direction in changes:
            parse_rate(new)  # every rate checked before the first change
        for new, direction in changes:
            set_link_rate(home, host, new, name, direction)
    state, plan = find_lab(home, name)
    rates = {hp.host: state.link_rates(hp.host) for hp in plan.hosts
             if host is None or hp.host == host}
    if as_json:
        print_json({"lab": state.name, "links": {
            h: {"up": u, "down": d} for h, (u, d) in rates.items()}})
        return
    if changes:
        out.print(f"lab [bold]{state.name}[/] {host}: " + ", ".join(
            f"{'both directions' if d == 'both' else d + 'link'} now {r}" for r, d in changes))
    table = Table("host", "uplink (sends)", "downlink (receives)")
    for h, (u, d) in rates.items():
        table.add_row(h, u, d)
    out.print(table)


@app.command()
def traffic(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Host that sends (h1, h2, ...).")],
    dst: Annotated[str, typer.Argument(metavar="DST", help="Host that receives.")],
    rate: Annotated[str | None, typer.Option(
        metavar="RATE",
        help="Send at this rate, tc syntax (100mbit); default: as fast as the links go.")
    ] = None,
    seconds: Annotated[float, typer.Option(
        metavar="SECONDS", callback=positive, help="How long to send, seconds.")] = 5.0,
    name: Annotated[str | None, typer.Option(help="Lab name (default: the inventory's lab).")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Send tenant traffic (one TCP stream) between two lab hosts over the migration
    network, and report what got through and what the links carried.

    The sender's uplink and the receiver's downlink both carry it, so it runs at the
    slower of the two (less about 5 % of TCP/IP headers). Use it to load links while a
    migration runs, or to check a rate set with 'vmigrate lab link'.
    """
    from vmigrate.lab._plan import parse_rate
    from vmigrate.lab.traffic import LinkSampler, TenantTraffic

    bytes_per_s = parse_rate(rate) / 8 if rate is not None else None
    home = state_home()
    with LinkSampler(home, [src, dst], name) as sampler, \
            TenantTraffic(home, src, dst, bytes_per_s, name, seconds=seconds) as tenant:
        _say(f"sending from {src} to {dst} for {seconds:g} s")
        result = tenant.wait()
    wire = {
        f"{src}_up": _wire(sampler, src, "up"),
        f"{dst}_down": _wire(sampler, dst, "down"),
    }
    if as_json:
        print_json({**dataclasses.asdict(result), "rate": result.rate, "wire": wire})
        return
    out.print(f"{src} -> {dst}: {result.received_bytes} bytes in {result.seconds:.2f} s, "
              f"[bold]{_mbit(result.rate)}[/] (payload)")
    for label, w in wire.items():
        out.print(f"  wire {label.replace('_', ' ')}link: mean {_mbit(w['mean'])}, "
                  f"busiest 1 s {_mbit(w['peak_1s'])}")


def _wire(sampler: LinkSampler, host: str, direction: Direction) -> dict[str, float]:
    return {"mean": sampler.total(host, direction).rate,
            "peak_1s": sampler.peak(host, direction)}


def _mbit(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.1f} mbit/s"


@app.command()
def image(
    force: Annotated[bool, typer.Option(help="Rebuild even if the image is current.")] = False,
) -> None:
    """Build the lab guest image (Debian kernel + busybox initramfs with workloads).

    Downloads the kernel package with apt (not installed), compiles the C
    workloads statically. Cached in $VMIGRATE_IMAGE_DIR (~/.cache/vmigrate/images).
    """
    from vmigrate.lab.image import build_image

    img = build_image(force=force, progress=_progress)
    out.print(f"kernel {img.kernel}\ninitrd {img.initrd}")
