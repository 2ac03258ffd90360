"""Unit tests for vmigrate.lab.image: workloads, kernel command line, build helpers."""

from __future__ import annotations

import gzip
import json
import lzma
import sys
from importlib import resources
from pathlib import Path

import pytest

from vmigrate.errors import EnvironmentError_, LabError, SpecError
from vmigrate.lab import image as image_mod
from vmigrate.lab.image import (
    IMAGE_DIR_ENV,
    WORKLOAD_DEFAULTS,
    GuestImage,
    Workload,
    default_image_dir,
    format_workloads,
    image_paths,
    kernel_cmdline,
    parse_size,
    parse_workload,
    parse_workloads,
)


@pytest.mark.parametrize(
    ("text", "kind", "params"),
    [
        ("memtouch", "memtouch", {}),
        ("memtouch:wss=256M,rate=50000", "memtouch", {"wss": "256M", "rate": "50000"}),
        ("memtouch:rate=0", "memtouch", {"rate": "0"}),
        ("memtouch:wss=1G", "memtouch", {"wss": "1G"}),
        ("memtouch:wss=4096", "memtouch", {"wss": "4096"}),
        ("diskwrite", "diskwrite", {}),
        ("diskwrite:dev=/dev/vdb", "diskwrite", {"dev": "/dev/vdb"}),
        (
            "diskwrite:dev=/dev/vda,rate=0,size=8K",
            "diskwrite",
            {"dev": "/dev/vda", "rate": "0", "size": "8K"},
        ),
        ("idle", "idle", {}),
        (" idle ", "idle", {}),
    ],
)
def test_parse_workload_good(text: str, kind: str, params: dict[str, str]) -> None:
    w = parse_workload(text)
    assert w.kind == kind
    assert w.params == params


@pytest.mark.parametrize(
    "text",
    [
        "",
        "memtuoch",
        "MEMTOUCH",
        "memtouch:",
        "memtouch:wss",
        "memtouch:wss=",
        "memtouch:=64M",
        "memtouch:wss=64X",
        "memtouch:wss=-1M",
        "memtouch:wss=1K",
        "memtouch:wss=2048G",
        "memtouch:rate=fast",
        "memtouch:rate=-5",
        "memtouch:rate=1.5",
        "memtouch:rate=10K",
        "memtouch:wss=64M,wss=32M",
        "memtouch:wss=64M,,rate=1",
        "memtouch:size=4096",
        "memtouch:wss=64M rate=1",
        "diskwrite:dev=vdb",
        "diskwrite:dev=/dev/../etc/passwd",
        "diskwrite:dev=/dev/vd b",
        "diskwrite:size=100",
        "diskwrite:size=0",
        "diskwrite:size=2M",
        "diskwrite:rate=x",
        "diskwrite:wss=64M",
        "idle:rate=1",
        "idle:",
    ],
)
def test_parse_workload_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_workload(text)


def test_workload_constructor_validates() -> None:
    with pytest.raises(SpecError):
        Workload("memtouch", {"bogus": "1"})
    with pytest.raises(SpecError):
        Workload("sleep")  # type: ignore[arg-type]
    assert Workload("idle").params == {}


def test_workload_text_round_trip() -> None:
    for text in [
        "idle",
        "memtouch",
        "memtouch:wss=64M,rate=5000",
        "diskwrite:size=512,dev=/dev/vdc",
    ]:
        w = parse_workload(text)
        assert str(w) == text
        assert parse_workload(str(w)) == w


def test_effective_params_fill_defaults() -> None:
    w = parse_workload("memtouch:rate=7")
    assert w.effective_params() == {"wss": WORKLOAD_DEFAULTS["memtouch"]["wss"], "rate": "7"}
    assert parse_workload("diskwrite").effective_params()["dev"] == "/dev/vdb"


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("idle", ["idle"]),
        ("memtouch:wss=64M,rate=5000", ["memtouch"]),
        (
            "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50"
            "+diskwrite:dev=/dev/vdb,rate=20",
            ["memtouch", "diskwrite", "diskwrite"],
        ),
        ("diskwrite+diskwrite:dev=/dev/vdc", ["diskwrite", "diskwrite"]),
        ("diskwrite:dev=/dev/vda+memtouch", ["diskwrite", "memtouch"]),
        (" memtouch + diskwrite ", ["memtouch", "diskwrite"]),
        (
            "memtouch+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb+diskwrite:dev=/dev/vdc",
            ["memtouch", "diskwrite", "diskwrite", "diskwrite"],
        ),
    ],
)
def test_parse_workloads_good(text: str, kinds: list[str]) -> None:
    ws = parse_workloads(text)
    assert isinstance(ws, tuple)
    assert [w.kind for w in ws] == kinds
    assert ws == tuple(parse_workload(part) for part in text.split("+"))


def test_parse_workloads_keeps_params_and_round_trips() -> None:
    text = "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb"
    ws = parse_workloads(text)
    assert ws[0].params == {"wss": "64M", "rate": "5000"}
    assert ws[1].params == {"dev": "/dev/vda", "rate": "50"}
    assert ws[2].effective_params() == {"dev": "/dev/vdb", "rate": "50", "size": "4096"}
    assert format_workloads(ws) == text
    assert parse_workloads(format_workloads(ws)) == ws
    assert format_workloads(ws[0]) == "memtouch:wss=64M,rate=5000"
    assert format_workloads([parse_workload("idle")]) == "idle"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "+",
        "memtouch+",
        "+memtouch",
        "memtouch++diskwrite",
        "memtouch+ +diskwrite",
        # more than four
        "memtouch+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb+diskwrite:dev=/dev/vdc"
        "+diskwrite:dev=/dev/vdd",
        "idle+idle+idle+idle+idle",
        # two memtouch
        "memtouch+memtouch",
        "memtouch:wss=16M+diskwrite+memtouch:wss=32M",
        # two diskwrite on one device (the default dev counts)
        "diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vda",
        "diskwrite+diskwrite",
        "diskwrite+diskwrite:dev=/dev/vdb",
        "diskwrite:dev=/dev/vdb,rate=1+memtouch+diskwrite:rate=2",
        # idle runs nothing: joining it is a mistake
        "idle+memtouch",
        "diskwrite+idle",
        # a bad part
        "memtouch+diskwrite:dev=vdb",
        "memtouch:wss=lots+diskwrite",
        "memtouch+sleep",
        "memtouch+diskwrite:",
    ],
)
def test_parse_workloads_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_workloads(text)


def test_parse_workload_takes_one_only() -> None:
    with pytest.raises(SpecError):
        parse_workload("memtouch+diskwrite")


def test_format_workloads_checks_the_combination() -> None:
    with pytest.raises(SpecError):
        format_workloads([])
    with pytest.raises(SpecError):
        format_workloads([Workload("memtouch"), Workload("memtouch")])
    with pytest.raises(SpecError):
        format_workloads([Workload("diskwrite"), Workload("diskwrite", {"dev": "/dev/vdb"})])
    with pytest.raises(SpecError):
        format_workloads([Workload("idle")] * 5)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20), ("1G", 1 << 30)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1T", "1.5G", "-1", " 1M", "1MB"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text)


def _cmdline_args(cmdline: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in cmdline.split():
        key, _eq, value = token.partition("=")
        out[key] = value
    return out


def test_kernel_cmdline_round_trip() -> None:
    w = parse_workload("memtouch:wss=64M,rate=5000")
    line = kernel_cmdline(ip="10.242.1.100/24", gateway="10.242.1.1", workload=w, extra="quiet")
    assert line.startswith("console=ttyS0 panic=-1 pti=on ")
    assert line.endswith(" quiet")
    args = _cmdline_args(line)
    assert args["vmigrate.ip"] == "10.242.1.100/24"
    assert args["vmigrate.gw"] == "10.242.1.1"
    assert parse_workload(args["vmigrate.workload"]) == w
    assert len(line.split()) == 7


def test_kernel_cmdline_minimal() -> None:
    assert kernel_cmdline() == "console=ttyS0 panic=-1 pti=on"
    line = kernel_cmdline(workload=parse_workload("idle"))
    assert line == "console=ttyS0 panic=-1 pti=on vmigrate.workload=idle"


def test_kernel_cmdline_several_workloads() -> None:
    text = "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb"
    ws = parse_workloads(text)
    line = kernel_cmdline(ip="10.242.1.100/24", workload=ws)
    args = _cmdline_args(line)
    assert args["vmigrate.workload"] == text
    assert parse_workloads(args["vmigrate.workload"]) == ws
    assert len(line.split()) == 5  # one token: the kernel splits its command line on spaces
    assert kernel_cmdline(workload=list(ws)) == kernel_cmdline(workload=ws)
    single = parse_workload("diskwrite:dev=/dev/vda")
    assert kernel_cmdline(workload=(single,)) == kernel_cmdline(workload=single)


def test_kernel_cmdline_refuses_workloads_that_cannot_run_together() -> None:
    with pytest.raises(SpecError):
        kernel_cmdline(workload=(Workload("memtouch"), Workload("memtouch")))
    with pytest.raises(SpecError):
        kernel_cmdline(workload=())


@pytest.mark.parametrize(
    ("ip", "gateway"),
    [
        ("10.0.0.1", None),
        ("10.0.0.300/24", None),
        ("10.0.0.1/33", None),
        ("host/24", None),
        (None, "10.0.0.1/24"),
        (None, "gateway"),
    ],
)
def test_kernel_cmdline_bad_addresses(ip: str | None, gateway: str | None) -> None:
    with pytest.raises(SpecError):
        kernel_cmdline(ip=ip, gateway=gateway)


def test_default_image_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(IMAGE_DIR_ENV, str(tmp_path))
    assert default_image_dir() == tmp_path
    monkeypatch.delenv(IMAGE_DIR_ENV)
    assert default_image_dir() == Path.home() / ".cache" / "vmigrate" / "images"


def test_image_paths_missing(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentError_):
        image_paths(tmp_path)


def test_image_paths_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("kernel", "initramfs.cpio.gz", "image.json"):
        (tmp_path / name).write_bytes(b"x")
    assert image_paths(tmp_path) == GuestImage(
        kernel=tmp_path / "kernel", initrd=tmp_path / "initramfs.cpio.gz"
    )
    monkeypatch.setenv(IMAGE_DIR_ENV, str(tmp_path))
    assert image_paths().kernel == tmp_path / "kernel"


def test_build_image_returns_at_once_when_current(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kernel = ("linux-image-6.1.0-99-amd64", "6.1.999-1")
    monkeypatch.setattr(image_mod, "_quiet_kernel_package", lambda: kernel)

    def no_build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(image_mod, "_build", no_build)
    monkeypatch.setattr(image_mod, "_kernel_package", no_build)
    for name in ("kernel", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    stamp = {
        "format": image_mod.BUILD_FORMAT,
        "sources": image_mod._sources_digest(),
        "kernel_package": kernel[0],
        "kernel_version": kernel[1],
    }
    (tmp_path / "image.json").write_text(json.dumps(stamp))
    got = image_mod.build_image(tmp_path)
    assert got == GuestImage(tmp_path / "kernel", tmp_path / "initramfs.cpio.gz")


def test_stamp_mismatch_is_not_current(tmp_path: Path) -> None:
    for name in ("kernel", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    digest = image_mod._sources_digest()
    kernel = ("linux-image-a", "1")
    assert not image_mod._is_current(tmp_path, digest, kernel)  # no stamp
    (tmp_path / "image.json").write_text(
        f'{{"format": {image_mod.BUILD_FORMAT}, "sources": "{digest}",'
        ' "kernel_package": "linux-image-a", "kernel_version": "1"}'
    )
    assert image_mod._is_current(tmp_path, digest, kernel)
    assert image_mod._is_current(tmp_path, digest, None)
    assert not image_mod._is_current(tmp_path, digest, ("linux-image-a", "2"))
    assert not image_mod._is_current(tmp_path, "0" * 64, kernel)


def test_resolve_kernel_from_metadata() -> None:
    meta = (
        "Package: linux-image-amd64\nVersion: 6.1.1-1\n"
        "Depends: linux-image-6.1.0-9-amd64 (= 6.1.1-1)\n"
    )
    assert image_mod._resolve_kernel(meta) == ("linux-image-6.1.0-9-amd64", "6.1.1-1")
    assert image_mod._resolve_kernel("Package: x\nVersion: 1\n") is None


def test_guest_sources_are_packaged() -> None:
    for name in image_mod.GUEST_SOURCES:
        assert image_mod._guest_source(name)
    assert image_mod._guest_source("init").startswith(b"#!/bin/sh\n")


def test_every_guest_file_is_hashed_into_the_stamp() -> None:
    # A file under guest/ left out of GUEST_SOURCES would not trigger a rebuild.
    guest = resources.files("vmigrate.lab").joinpath("guest")
    on_disk = {f.name for f in guest.iterdir() if f.is_file() and not f.name.startswith(".")}
    assert on_disk == set(image_mod.GUEST_SOURCES)
    for program in image_mod.GUEST_PROGRAMS:
        assert f"{program}.c" in image_mod.GUEST_SOURCES


def _cpio_names(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive: name -> (mode, data)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start : data_start + filesize]
        pos = (data_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data)


def test_cpio_writer_makes_parents_first() -> None:
    cpio = image_mod._Cpio()
    cpio.file("a/b/c", b"hello", 0o755)
    cpio.symlink("bin/sh", "/bin/busybox")
    cpio.chardev("dev/console", 5, 1)
    raw = cpio.finish()
    assert len(raw) % 512 == 0
    names = _cpio_names(raw)
    assert list(names) == ["a", "a/b", "a/b/c", "bin", "bin/sh", "dev", "dev/console"]
    assert names["a/b/c"] == (0o100755, b"hello")
    assert names["bin/sh"] == (0o120777, b"/bin/busybox")
    assert names["a"][0] == 0o040755
    assert gzip.decompress(gzip.compress(raw)) == raw


def test_is_static_elf() -> None:
    assert not image_mod._is_static_elf(b"#!/bin/sh\n" + b"\0" * 100)
    # The Python interpreter is dynamically linked (it has a PT_INTERP).
    assert not image_mod._is_static_elf(Path(sys.executable).resolve().read_bytes())


def test_collect_modules_orders_by_depends(tmp_path: Path) -> None:
    def module(depends: str) -> bytes:
        return b"\x7fELF junk\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"

    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "ring.ko").write_bytes(module(""))
    (tmp_path / "drivers" / "core.ko.xz").write_bytes(lzma.compress(module("ring")))
    (tmp_path / "drivers" / "pci-dev.ko").write_bytes(module(""))
    (tmp_path / "drivers" / "net.ko").write_bytes(module("ring,core,pci_dev"))
    (tmp_path / "drivers" / "unused.ko").write_bytes(module(""))
    order = image_mod._collect_modules(tmp_path, ["net", "core"])
    assert [name for name, _data in order] == ["ring", "core", "pci_dev", "net"]
    assert order[1][1] == module("ring")  # decompressed


def test_collect_modules_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "a.ko").write_bytes(b"\x00depends=b\x00")
    with pytest.raises(LabError):
        image_mod._collect_modules(tmp_path, ["a"])


def test_thin_raw_image(tmp_path: Path) -> None:
    from vmigrate.lab.disks import thin_raw_image

    path = tmp_path / "d.raw"
    thin_raw_image(path, 64 << 20, 4 << 20)
    assert path.stat().st_size == 64 << 20
    assert 4 << 20 <= path.stat().st_blocks * 512 < 8 << 20  # thin: only the data
    blob = path.read_bytes()
    assert blob[: 30 << 20] == bytes(30 << 20) and blob[30 << 20: 34 << 20] != bytes(4 << 20)
    with pytest.raises(ValueError):
        thin_raw_image(path, 1 << 20, 2 << 20)
