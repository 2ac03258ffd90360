"""``vmigrate vm ...``: define, start, stop and inspect VMs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from vmigrate.cli._common import CTX, out, positive, print_json, run
from vmigrate.errors import UserError
from vmigrate.service.vms import CreateRequest, VmInfo, VmService

app = typer.Typer(
    rich_markup_mode=None,
    help="Define, start, stop and inspect VMs on the inventory's hosts.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _service() -> VmService:
    return VmService(CTX.inventory(), CTX.store())


def _render(info: VmInfo) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    spec = info.spec
    table.add_row("name", info.name)
    table.add_row("host", info.host)
    table.add_row("state", info.state.value)
    table.add_row("pid", str(info.pid) if info.pid else "-")
    table.add_row("vcpus / memory", f"{spec.vcpus} / {spec.memory_mib} MiB")
    table.add_row("machine / cpu", f"{spec.machine} / "
                  + (spec.cpu.describe() if spec.cpu else "host's (no model of its own)"))
    for i, disk in enumerate(spec.disks):
        table.add_row(f"disk{i}", f"{disk.path} ({disk.format}, {disk.bus})")
    for i, nic in enumerate(spec.nics):
        table.add_row(f"nic{i}", f"{nic.mac} on bridge {nic.bridge}")
    if spec.kernel:
        table.add_row("kernel", spec.kernel.kernel)
        table.add_row("cmdline", spec.kernel.append or "-")
    if spec.ip:
        table.add_row("ip", spec.ip)
    if spec.workload:
        table.add_row("workload", spec.workload)
    out.print(table)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Name of the new VM (letters, digits, . _ -).")],
    host: Annotated[str, typer.Option("--host", "-H", help="Inventory host to run it on.")],
    memory: Annotated[str, typer.Option(help="Guest RAM, e.g. 256M or 2G.")] = "256M",
    vcpus: Annotated[int, typer.Option(help="Number of virtual CPUs.")] = 1,
    disk: Annotated[
        list[str] | None,
        typer.Option(
            "--disk", metavar="PATH[,OPT=V]",
            help="Disk image on the host: PATH[,format=raw|qcow2][,bus=virtio|ide|scsi]"
            "[,cache=none|writeback][,readonly=on]. A comma in PATH is written ',,'. "
            "Repeat for more disks; the first one boots.",
        ),
    ] = None,
    kernel: Annotated[str | None, typer.Option(help="Boot this kernel instead of a disk.")] = None,
    initrd: Annotated[str | None, typer.Option(help="Initramfs for --kernel.")] = None,
    append: Annotated[str, typer.Option(help="Kernel command line for --kernel.")] = "",
    workload: Annotated[
        str | None,
        typer.Option(
            help="Boot the lab guest image running this workload: idle, "
            "memtouch[:wss=256M,rate=50000] (pages/s) or diskwrite[:dev=/dev/vdb,rate=50]; "
            "join several with '+' (memtouch:wss=64M+diskwrite:dev=/dev/vda).",
        ),
    ] = None,
    ip: Annotated[
        str | None, typer.Option(help="Lab guests: address on the VM network (default: next free).")
    ] = None,
    no_nic: Annotated[
        bool, typer.Option("--no-nic", help="No NIC (default: one on the host's vm_bridge).")
    ] = False,
    nics: Annotated[
        list[str] | None,
        typer.Option(
            "--nic", metavar="BRIDGE[,OPT=V]",
            help="NIC on a host bridge: BRIDGE[,mac=MAC][,model=e1000]. "
            "Repeat for more; replaces the default NIC.",
        ),
    ] = None,
    machine: Annotated[str, typer.Option(
        help="QEMU machine type (pc, q35, pc-i440fx-7.2 ...); an alias is stored as the "
        "versioned type the host's QEMU resolves it to.")] = "pc",
    cpu: Annotated[str | None, typer.Option(
        "--cpu", metavar="MODEL[,+FEAT|-FEAT]",
        help="Guest CPU model: a baseline (x86-64-v2-AES, x86-64-v2, x86-64-v3, x86-64-v4) "
        "or a QEMU model (Nehalem, Skylake-Client-v4 ...), with features switched on or off "
        "(+aes, -x2apic). Default: the host's vm_cpu, the inventory's [defaults] cpu, else "
        "x86-64-v2-AES. 'host' only on hosts the inventory declares identical (cpu_group). "
        "Refused if the host cannot give every feature.")] = None,
    start: Annotated[bool, typer.Option(help="Start the VM after defining it.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Define a VM on a host and start it.

    Boots from the first --disk through the BIOS, from --kernel, or, with
    --workload (or with neither a disk nor a kernel), the lab guest image.
    Every check (host known, memory size valid, files present on the host)
    runs before anything is created.
    """
    req = CreateRequest(
        name=name, host=host, memory=memory, vcpus=vcpus, disks=list(disk or []),
        kernel=kernel, initrd=initrd, append=append, workload=workload, ip=ip, nic=not no_nic,
        nics=list(nics or []), machine=machine, start=start, cpu=cpu,
    )

    async def go() -> VmInfo:
        async with _service() as svc:
            return await svc.create(req)

    info = run(go())
    if as_json:
        print_json(info.as_dict())
    else:
        verb = "started" if start else "defined"
        extra = f", ip {info.spec.ip}" if info.spec.ip else ""
        out.print(f"VM [bold]{info.name}[/] {verb} on {info.host}{extra}")


@app.command()
def start(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Start a defined VM on its host."""

    async def go() -> VmInfo:
        async with _service() as svc:
            return await svc.start(name)

    info = run(go())
    out.print(f"VM [bold]{info.name}[/] started on {info.host} (pid {info.pid})")


@app.command()
def stop(
    name: Annotated[str, typer.Argument(help="VM name.")],
    force: Annotated[bool, typer.Option(help="Stop at once (QMP quit, then signals).")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the guest's ACPI shutdown.",
                            callback=positive)
    ] = 30.0,
) -> None:
    """Shut a VM down: ACPI power button, or at once with --force.

    A guest that ignores the power button keeps running and the command fails
    after --timeout; nothing is lost.
    """

    async def go() -> bool:
        async with _service() as svc:
            return await svc.stop(name, force=force, timeout=timeout)

    was_running = run(go())
    out.print(f"VM [bold]{name}[/] {'stopped' if was_running else 'was not running'}")


@app.command()
def destroy(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Stop a VM hard if it runs and remove it from vmigrate. Disk images are kept.

    Refused (exit status 2, nothing stopped) while a migration job locks the VM: a
    running job, one waiting for an operator, or a job of another controller holding
    the VM's lock file on its host. The same holds for start, stop and qmp.
    """

    async def go() -> None:
        async with _service() as svc:
            await svc.destroy(name)

    run(go())
    out.print(f"VM [bold]{name}[/] destroyed (disk images kept)")


@app.command()
def show(name: Annotated[str, typer.Argument(help="VM name.")], as_json: JsonOpt = False) -> None:
    """Show a VM's spec, host and live state."""

    async def go() -> VmInfo:
        async with _service() as svc:
            return await svc.show(name)

    info = run(go())
    if as_json:
        print_json(info.as_dict())
    else:
        _render(info)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List VMs with their host and state (asks each host)."""

    async def go() -> list[VmInfo]:
        async with _service() as svc:
            return await svc.list()

    infos = run(go())
    if as_json:
        print_json([{"name": i.name, "host": i.host, "state": i.state.value, "ip": i.spec.ip}
                    for i in infos])
        return
    table = Table("name", "host", "state", "ip", "workload")
    for i in infos:
        table.add_row(i.name, i.host, i.state.value, i.spec.ip or "-", i.spec.workload or "-")
    out.print(table)


@app.command()
def console(
    name: Annotated[str, typer.Argument(help="VM name.")],
    lines: Annotated[int | None, typer.Option("--lines", "-n", help="Only the last N lines.")
                     ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output.")
                      ] = False,
) -> None:
    """Print the VM's serial console log (what the guest wrote on ttyS0)."""

    async def go() -> None:
        async with _service() as svc:
            text = await svc.console(name, lines)
            out.out(text, end="")
            seen = len(text)
            while follow:
                await asyncio.sleep(1)
                full = await svc.console(name)
                if len(full) < seen:
                    seen = 0
                out.out(full[seen:], end="")
                seen = len(full)

    with contextlib.suppress(KeyboardInterrupt):
        run(go())


@app.command()
def qmp(
    name: Annotated[str, typer.Argument(help="VM name.")],
    command: Annotated[
        str,
        typer.Argument(
            help='A QMP command as JSON, e.g. \'{"execute": "query-status"}\'; '
            "a bare command name also works."
        ),
    ],
) -> None:
    """Send one raw QMP command to the VM's monitor and print QEMU's JSON reply."""
    message: dict[str, Any]
    text = command.strip()
    if text.startswith("{"):
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON: {exc}") from exc
    else:
        message = {"execute": text}

    async def go() -> dict[str, Any]:
        async with _service() as svc:
            return await svc.qmp(name, message)

    reply = run(go())
    print_json(reply)
    if "error" in reply:
        raise typer.Exit(1)
