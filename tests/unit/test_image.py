"""Unit tests for vmigrate.lab.image: where the image lives, build helpers."""

from __future__ import annotations

import gzip
import json
import lzma
import sys
from importlib import resources
from pathlib import Path

import pytest

from vmigrate.errors import EnvironmentError_, LabError
from vmigrate.lab import image as image_mod
from vmigrate.lab.image import (
    IMAGE_DIR_ENV,
    GuestImage,
    default_image_dir,
    image_paths,
)


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
