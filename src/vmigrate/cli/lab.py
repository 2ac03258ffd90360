"""``vmigrate lab ...``: the embedded testbed datacenter."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from vmigrate.cli._common import err, out, print_json
from vmigrate.config import state_home
from vmigrate.progress import lines

app = typer.Typer(
    rich_markup_mode=None,
    help="Build and tear down a small datacenter on this machine (needs root): hosts are "
    "network namespaces with their own sshd, linked by shaped migration links.",
    no_args_is_help=True,
)


def _say(msg: str) -> None:
    err.print(f"[dim]· {msg}[/]")


_progress = lines(_say)


@app.command()
def up(
    hosts: Annotated[int, typer.Option(help="Number of hosts (1-8).")] = 2,
    link_rate: Annotated[
        str, typer.Option(help="Migration link rate per host, tc syntax: 200mbit, 1gbit.")
    ] = "1gbit",
    name: Annotated[str, typer.Option(help="Lab name: a letter then up to 5 letters/digits.")
                    ] = "vml",
    as_json: Annotated[bool, typer.Option("--json", help="Print the inventory as JSON.")] = False,
) -> None:
    """Build the lab and write its inventory to $VMIGRATE_HOME/vmigrate.toml."""
    from vmigrate.lab.net import LabSpec, lab_up

    inv = lab_up(LabSpec(name=name, hosts=hosts, link_rate=link_rate), state_home(),
                 progress=_progress)
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
    """Show the lab's hosts, their sshd and QEMU processes, and link rates."""
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
                  "link", "QEMU pids")
    for h in st.hosts:
        table.add_row(
            h.host,
            h.netns if h.netns_present else f"[red]{h.netns} missing[/]",
            f"pid {h.sshd_pid}" if h.sshd_alive else "[red]down[/]",
            h.mgmt_address,
            h.migration_address,
            f"{h.link_rate or '?'} {'up' if h.link_up else '[red]down[/]'}",
            " ".join(map(str, h.qemu_pids)) or "-",
        )
    out.print(table)


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
