"""VM spec -> QEMU command line. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass

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


def _opts(**kv: str | int | None) -> str:
    """``node_name="x", cache__direct="on"`` -> ``node-name=x,cache.direct=on``."""
    return ",".join(
        f"{k.replace('__', '.').replace('_', '-')}={v}" for k, v in kv.items() if v is not None
    )


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
        "-name", f"{spec.name},debug-threads=on",
        "-machine", f"{spec.machine},accel={accel}",
        "-cpu", "host" if accel == "kvm" else "qemu64",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-vga", "none",
        "-pidfile", paths.pidfile,
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-chardev",
        f"socket,id=serial0,path={paths.console_sock},server=on,wait=off,"
        f"logfile={paths.console_log},logappend=on",
        "-serial", "chardev:serial0",
    ]
    if daemonize:
        argv += ["-daemonize", "-D", paths.qemu_log]
    scsi = False
    for i, disk in enumerate(spec.disks):
        node = f"disk{i}"
        argv += [
            "-blockdev",
            _opts(
                driver="file", node_name=f"{node}-file", filename=disk.path,
                cache__direct="on" if disk.cache in {"none", "directsync"} else "off",
                discard="unmap",
            ),
            "-blockdev",
            # discard=unmap: zeroes written with "may unmap" (a mirror's copy of a hole,
            # a guest's TRIM) punch holes, so thin images stay thin
            _opts(
                driver=disk.format, node_name=node, file=f"{node}-file",
                read_only="on" if disk.readonly else "off", discard="unmap",
            ),
        ]
        bootindex = i if spec.kernel is None else None
        if disk.bus == "virtio":
            argv += ["-device", _opts(driver="virtio-blk-pci", drive=node, id=f"{node}-dev",
                                      bootindex=bootindex)]
        elif disk.bus == "ide":
            argv += ["-device", _opts(driver="ide-hd", drive=node, id=f"{node}-dev",
                                      bootindex=bootindex)]
        else:
            if not scsi:
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            argv += ["-device", _opts(driver="scsi-hd", drive=node, id=f"{node}-dev",
                                      bus="scsi0.0", bootindex=bootindex)]
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev", _opts(type="tap", id=f"net{i}", ifname=tap_name(spec.name, i),
                             script="no", downscript="no"),
            "-device", _opts(driver=nic.model, netdev=f"net{i}", mac=nic.mac, id=f"net{i}-dev",
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
