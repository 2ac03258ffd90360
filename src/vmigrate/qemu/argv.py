"""VM spec -> QEMU command line. Pure: no I/O.

Quoting once: a QEMU option string (``key=value,key=value``, as ``-blockdev``,
``-device``, ``-netdev``, ``-chardev``, ``-machine``, ``-name`` and ``-qmp`` read it) has
every value passed through :func:`qemu_value`, the one function that escapes them
(QEMU reads a doubled comma as a literal one), and through nothing else. Options that
QEMU takes whole (``-kernel``, ``-initrd``, ``-append``, ``-pidfile``, ``-D``) get the
value as it is: QEMU does not split those. The argv itself is a list: no shell ever
sees it (remote hosts get it quoted once by :func:`vmigrate.hosts.quote_argv`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigrate.errors import SpecError
from vmigrate.qemu.cpu import effective_cpu
from vmigrate.qemu.spec import VMSpec, tap_name


@dataclass(frozen=True)
class VmPaths:
    """Where a running VM keeps its runtime files on its host."""

    dir: str

    @property
    def pidfile(self) -> str:
        return f"{self.dir}/qemu.pid"

    @property
    def qmp(self) -> str:
        return f"{self.dir}/qmp.sock"

    @property
    def console_sock(self) -> str:
        return f"{self.dir}/console.sock"

    @property
    def console_log(self) -> str:
        return f"{self.dir}/console.log"

    @property
    def qemu_log(self) -> str:
        return f"{self.dir}/qemu.log"


def qemu_value(value: str | int) -> str:
    """One value for a QEMU option string, escaped: commas doubled, so that the value
    cannot end itself and start another option (``a,b`` -> ``a,,b``).

    Raises :class:`SpecError` for a NUL character, which no argv can carry."""
    text = str(value)
    if "\0" in text:
        raise SpecError("a QEMU option value cannot contain a NUL character")
    return text.replace(",", ",,")


def qemu_opts(first: str | None = None, **kv: str | int | None) -> str:
    """``qemu_opts("pc", accel="tcg")`` -> ``pc,accel=tcg``; ``node_name="x",
    cache__direct="on"`` -> ``node-name=x,cache.direct=on``. Every value, ``first`` (the
    option's implied value, such as the machine type) included, goes through
    :func:`qemu_value`; None values are left out. Keys are ours, never input."""
    parts = [] if first is None else [qemu_value(first)]
    parts += [f"{k.replace('__', '.').replace('_', '-')}={qemu_value(v)}"
              for k, v in kv.items() if v is not None]
    return ",".join(parts)



def cpu_option(spec: VMSpec, accel: str) -> str:
    """``-cpu``'s value: the spec's CPU model and its features (``qemu64-v1,aes=on,
    x2apic=off``), or for a spec without one what vmigrate ran before it had CPU models
    (:func:`vmigrate.qemu.cpu.effective_cpu`: ``host`` under KVM, ``qemu64`` under TCG).

    No ``enforce``: a host that lacks a feature starts the guest without it (QEMU warns),
    which a fresh boot survives; a running guest never meets such a host, because a live
    or online migration's begin refuses it (:func:`vmigrate.qemu.cpu.check_cpu`), and
    ``vm create`` refuses a model its host cannot give in full."""
    cpu = effective_cpu(spec.cpu, accel)
    return ",".join([qemu_value(cpu.model), *(
        f"{qemu_value(flag[1:])}={'on' if flag[0] == '+' else 'off'}" for flag in cpu.features)])


#: what :func:`memory_option` adds to a TCG guest's RAM (QEMU rounds ``-m`` to 8 KiB)
TCG_RAM_PAD_KIB = 8


def memory_option(spec: VMSpec, accel: str) -> str:
    """The ``-m`` value: the spec's memory, plus :data:`TCG_RAM_PAD_KIB` under TCG.

    QEMU before 9.0 loses guest writes when it migrates a TCG guest: the fast path of its
    dirty-bitmap sync (taken when a RAM block's offset and length are whole words of the
    bitmap, 64 pages) clears the migration bits without resetting the TCG TLB entries
    that had already marked those pages dirty, so later writes through them set no bit
    and are never sent (fixed upstream by "physmem: Fix migration dirty bitmap coherency
    with TCG memory access", 2024). A length that is not a multiple of 64 pages takes the
    page-by-page path, which resets the entries of every page it clears. Measured in the
    lab (docs/BENCHMARKS.md): without the pad and without the guest's own mitigations, 5
    of 5 busy guests arrived corrupted, with it 0 of 5. Both ends build the argv with
    their own accelerator, so a TCG source and a TCG destination agree; KVM tracks dirty
    pages in the kernel and gets the size as written.
    """
    if accel == "tcg":
        return f"{spec.memory_mib * 1024 + TCG_RAM_PAD_KIB}K"
    return f"{spec.memory_mib}M"


def build_argv(
    spec: VMSpec,
    paths: VmPaths,
    *,
    binary: str = "qemu-system-x86_64",
    accel: str = "kvm",
    incoming: str | None = None,
    paused: bool = False,
    daemonize: bool = True,
) -> list[str]:
    """The full QEMU command line for ``spec``.

    The VM's QMP monitor and serial console are unix sockets in ``paths.dir``;
    the console is also written to ``paths.console_log``.
    """
    argv = [
        binary,
        "-name", qemu_opts(spec.name, debug_threads="on"),
        "-machine", qemu_opts(spec.machine, accel=accel),
        "-cpu", cpu_option(spec, accel),
        "-smp", str(spec.vcpus),
        "-m", memory_option(spec, accel),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-vga", "none",
        "-pidfile", paths.pidfile,
        "-qmp", "unix:" + qemu_opts(paths.qmp, server="on", wait="off"),
        "-chardev",
        qemu_opts("socket", id="serial0", path=paths.console_sock, server="on", wait="off",
                  logfile=paths.console_log, logappend="on"),
        "-serial", "chardev:serial0",
    ]
    if daemonize:
        argv += ["-daemonize", "-D", paths.qemu_log]
    scsi = False
    for i, disk in enumerate(spec.disks):
        node = f"disk{i}"
        argv += [
            "-blockdev",
            qemu_opts(
                driver="file", node_name=f"{node}-file", filename=disk.path,
                cache__direct="on" if disk.cache in {"none", "directsync"} else "off",
                discard="unmap",
            ),
            "-blockdev",
            # discard=unmap: zeroes written with "may unmap" (a mirror's copy of a hole,
            # a guest's TRIM) punch holes, so thin images stay thin
            qemu_opts(
                driver=disk.format, node_name=node, file=f"{node}-file",
                read_only="on" if disk.readonly else "off", discard="unmap",
            ),
        ]
        bootindex = i if spec.kernel is None else None
        if disk.bus == "virtio":
            argv += ["-device", qemu_opts(driver="virtio-blk-pci", drive=node,
                                          id=f"{node}-dev", bootindex=bootindex)]
        elif disk.bus == "ide":
            argv += ["-device", qemu_opts(driver="ide-hd", drive=node, id=f"{node}-dev",
                                          bootindex=bootindex)]
        else:
            if not scsi:
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            argv += ["-device", qemu_opts(driver="scsi-hd", drive=node, id=f"{node}-dev",
                                          bus="scsi0.0", bootindex=bootindex)]
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev", qemu_opts(type="tap", id=f"net{i}", ifname=tap_name(spec.name, i),
                                 script="no", downscript="no"),
            "-device", qemu_opts(driver=nic.model, netdev=f"net{i}", mac=nic.mac,
                                 id=f"net{i}-dev",
                                 # no network-boot ROM when the kernel is given: faster boot
                                 romfile="" if spec.kernel is not None else None),
        ]
    if spec.kernel is not None:
        argv += ["-kernel", spec.kernel.kernel]
        if spec.kernel.initrd:
            argv += ["-initrd", spec.kernel.initrd]
        if spec.kernel.append:
            argv += ["-append", spec.kernel.append]
    if incoming is not None:
        argv += ["-incoming", incoming]
    if paused:  # -S: the guest runs only after "cont"
        argv += ["-S"]
    return argv
