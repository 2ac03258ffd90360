"""VM spec validation and spec -> QEMU argv."""

from __future__ import annotations

import pytest

from vmigrate.errors import SpecError
from vmigrate.qemu.argv import VmPaths, build_argv
from vmigrate.qemu.spec import (
    DiskSpec,
    KernelBoot,
    NicSpec,
    build_spec,
    mac_for,
    parse_disk,
    parse_memory,
    parse_size,
    tap_name,
)

PATHS = VmPaths("/data/vms/web1")


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize(
    ("text", "mib"), [("256M", 256), ("2G", 2048), ("1.5G", 1536), ("512", 512), ("1GiB", 1024)]
)
def test_parse_memory(text: str, mib: int) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["abc", "", "12X", "-5M", "1M"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_memory(text)


def test_parse_size_units() -> None:
    assert parse_size("4K") == 4096
    assert parse_size("1T") == 1024**4


def test_parse_disk_options() -> None:
    disk = parse_disk("/img/a.qcow2,format=qcow2,bus=ide,cache=none")
    assert disk == DiskSpec(path="/img/a.qcow2", format="qcow2", bus="ide", cache="none")


@pytest.mark.parametrize(
    "text", ["/img/a,format=vmdk", "/img/a,speed=3", "relative.img", "/img/a,format"]
)
def test_parse_disk_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_disk(text)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "a/b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(SpecError):
        build_spec(name=name, memory_mib=256)


def test_disk_boot_argv() -> None:
    spec = build_spec(
        name="web1", memory_mib=512, vcpus=2,
        disks=(DiskSpec(path="/img/root.qcow2", format="qcow2"),
               DiskSpec(path="/img/data.raw", bus="scsi")),
        nics=(NicSpec(bridge="brvm", mac=mac_for("web1")),),
    )
    argv = build_argv(spec, PATHS, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    # under TCG 8 KiB more, so that QEMU 7.2 syncs its dirty bitmap page by page
    assert _pairs(argv, "-m") == [f"{512 * 1024 + 8}K"]
    assert (512 * 1024 + 8) * 1024 % (64 * 4096) != 0
    assert _pairs(argv, "-smp") == ["2"]
    assert _pairs(argv, "-machine") == ["pc,accel=tcg"]
    assert _pairs(argv, "-pidfile") == ["/data/vms/web1/qemu.pid"]
    assert _pairs(argv, "-qmp") == ["unix:/data/vms/web1/qmp.sock,server=on,wait=off"]
    assert "-daemonize" in argv
    blockdevs = _pairs(argv, "-blockdev")
    assert ("driver=file,node-name=disk0-file,filename=/img/root.qcow2,cache.direct=off,"
            "discard=unmap") in blockdevs
    assert "driver=qcow2,node-name=disk0,file=disk0-file,read-only=off,discard=unmap" in blockdevs
    devices = _pairs(argv, "-device")
    assert "driver=virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=0" in devices
    assert "virtio-scsi-pci,id=scsi0" in devices
    assert "driver=scsi-hd,drive=disk1,id=disk1-dev,bus=scsi0.0,bootindex=1" in devices
    netdev = _pairs(argv, "-netdev")[0]
    assert f"ifname={tap_name('web1')}" in netdev
    assert f"mac={mac_for('web1')}" in _pairs(argv, "-device")[-1]
    assert "-kernel" not in argv


def test_kernel_boot_argv() -> None:
    spec = build_spec(
        name="g", memory_mib=256,
        kernel=KernelBoot(kernel="/k/vmlinuz", initrd="/k/initrd", append="console=ttyS0"),
        disks=(DiskSpec(path="/img/d.raw"),),
    )
    argv = build_argv(spec, PATHS, accel="kvm", incoming="defer", daemonize=False)
    assert _pairs(argv, "-kernel") == ["/k/vmlinuz"]
    assert _pairs(argv, "-initrd") == ["/k/initrd"]
    assert _pairs(argv, "-append") == ["console=ttyS0"]
    assert _pairs(argv, "-incoming") == ["defer"]
    assert _pairs(argv, "-cpu") == ["host"]
    assert _pairs(argv, "-m") == ["256M"]  # KVM: the size as written
    assert "-daemonize" not in argv
    # with a kernel, disks carry no boot index
    assert all("bootindex" not in d for d in _pairs(argv, "-device"))


def test_tap_and_mac_are_stable_and_short() -> None:
    assert tap_name("a-very-long-vm-name-indeed", 3) == tap_name("a-very-long-vm-name-indeed", 3)
    assert len(tap_name("a-very-long-vm-name-indeed", 3)) <= 15
    assert tap_name("a", 0) != tap_name("b", 0)
    assert mac_for("a").startswith("52:54:00:")


def test_parse_nic() -> None:
    from vmigrate.qemu.spec import parse_nic

    nic = parse_nic("br0,mac=52:54:00:AA:bb:cc,model=e1000", "vm", 0)
    assert (nic.bridge, nic.mac, nic.model) == ("br0", "52:54:00:aa:bb:cc", "e1000")
    assert parse_nic("br1", "vm", 1).mac == mac_for("vm", 1)
    for bad in ("br0,mac=zz", "br0,speed=1", ",mac=52:54:00:00:00:01"):
        with pytest.raises(SpecError):
            parse_nic(bad, "vm", 0)
