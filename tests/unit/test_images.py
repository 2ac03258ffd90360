"""Unit tests for vmigrate.qemu.images: pure helpers, parsers, and real runs of
qemu-img, df and stat on a LocalHost in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vmigrate.errors import ConflictError, EnvironmentError_, SpecError
from vmigrate.hosts import LocalHost
from vmigrate.qemu.images import (
    QCOW2_FIXED_OVERHEAD,
    ImageInfo,
    _parse_df_avail,
    _parse_image_info,
    _parse_stat_allocated,
    allocated_bytes,
    compare_images,
    create_image,
    free_bytes,
    image_info,
    qcow2_overhead,
    remove_image,
    required_bytes,
    target_path,
)

MiB = 1 << 20
GiB = 1 << 30

# ----------------------------------------------------------------------------- pure


def test_target_path() -> None:
    assert target_path("/var/lib/pool", "web1", 0, "qcow2") == "/var/lib/pool/web1-disk0.qcow2"
    assert target_path("/var/lib/pool/", "web1", 3, "raw") == "/var/lib/pool/web1-disk3.raw"


@pytest.mark.parametrize(
    ("pool", "vm", "index", "fmt"),
    [
        ("pool", "vm", 0, "raw"),  # relative pool
        ("/pool", "a/b", 0, "raw"),  # VM name with a slash
        ("/pool", "..", 0, "raw"),
        ("/pool", "", 0, "raw"),
        ("/pool", "vm", -1, "raw"),
        ("/pool", "vm", 0, "vmdk"),
    ],
)
def test_target_path_refuses(pool: str, vm: str, index: int, fmt: str) -> None:
    with pytest.raises(SpecError):
        target_path(pool, vm, index, fmt)  # type: ignore[arg-type]


def test_qcow2_overhead_covers_qemu_img_measure() -> None:
    # `qemu-img measure --output=json -O qcow2 --size N` on QEMU 7.2: fully-allocated - N
    measured = {64 * GiB: 10747904, 1024 * GiB: 168034304}
    for size, meta in measured.items():
        assert meta <= qcow2_overhead(size) <= meta + 2 * MiB
    assert qcow2_overhead(0) == QCOW2_FIXED_OVERHEAD
    assert qcow2_overhead(8192) == 1 + 1 + QCOW2_FIXED_OVERHEAD  # rounded up, each part
    with pytest.raises(SpecError):
        qcow2_overhead(-1)


def test_required_bytes() -> None:
    thin = ImageInfo("/p/a.raw", "raw", virtual_size=64 * GiB, actual_size=3 * GiB)
    assert required_bytes(thin, "raw") == 3 * GiB
    assert required_bytes(thin, "qcow2") == 3 * GiB + qcow2_overhead(64 * GiB)
    # never more than a fully allocated target
    fat = ImageInfo("/p/a.raw", "raw", virtual_size=1 * GiB, actual_size=1 * GiB + 12 * MiB)
    assert required_bytes(fat, "raw") == 1 * GiB
    assert required_bytes(fat, "qcow2") == 1 * GiB + qcow2_overhead(1 * GiB)
    # a backing chain is flattened: its top layer says nothing about the rest
    top = ImageInfo("/p/t.qcow2", "qcow2", 8 * GiB, 200_000, backing_file="/p/base.qcow2")
    assert required_bytes(top, "raw") == 8 * GiB
    with pytest.raises(SpecError):
        required_bytes(thin, "vmdk")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsers

QCOW2_JSON = """{
    "virtual-size": 67108864,
    "filename": "a.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}},
    "dirty-flag": false
}
"""


def test_parse_image_info() -> None:
    info = _parse_image_info("/x/a.qcow2", QCOW2_JSON)
    assert info == ImageInfo("/x/a.qcow2", "qcow2", 67108864, 200704, None)
    backed = json.loads(QCOW2_JSON) | {
        "backing-filename": "base.qcow2", "full-backing-filename": "/x/base.qcow2"}
    assert _parse_image_info("/x/a", json.dumps(backed)).backing_file == "/x/base.qcow2"
    # no actual-size (e.g. over a protocol): counted as fully allocated
    no_actual = {"format": "raw", "virtual-size": 4096}
    assert _parse_image_info("/x/r", json.dumps(no_actual)).actual_size == 4096


@pytest.mark.parametrize(
    "text",
    [
        "",
        "qemu-img: Could not open",
        "[]",
        '{"format": "raw"}',
        '{"format": "raw", "virtual-size": -1}',
        '{"format": "raw", "virtual-size": true}',
        '{"format": "raw", "virtual-size": "1G"}',
        '{"format": "", "virtual-size": 1}',
        '{"format": "raw", "virtual-size": 1, "actual-size": 1.5}',
        '{"format": "raw", "virtual-size": 1, "backing-filename": 3}',
    ],
)
def test_parse_image_info_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        _parse_image_info("/x", text)


def test_parse_df_avail() -> None:
    assert _parse_df_avail("      Avail\n85440987136\n") == 85440987136
    assert _parse_df_avail("Avail\n0") == 0
    assert _parse_df_avail("\n  Avail  \n   12  \n\n") == 12


@pytest.mark.parametrize(
    "text", ["", "Avail\n", "85440987136\n", "Avail\n12K\n", "Avail\n-\n", "Avail\n1\n2\n",
             "Used\n12\n", "Avail\n-5\n"],
)
def test_parse_df_avail_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        _parse_df_avail(text)


def test_parse_stat_allocated() -> None:
    assert _parse_stat_allocated("392 512\n") == 200704
    assert _parse_stat_allocated("0 512") == 0
    for bad in ("", "392", "392 512 1", "a 512", "392 0", "-1 512"):
        with pytest.raises(ValueError):
            _parse_stat_allocated(bad)


# ----------------------------------------------------------------- on a LocalHost

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@pytest.fixture
def host() -> LocalHost:
    return LocalHost("ctl")


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@needs_qemu_img
async def test_create_info_thin(host: LocalHost, tmp_path: Path) -> None:
    raw = str(tmp_path / "pool" / "sub" / "a.raw")  # parent directories made on the way
    qcow = str(tmp_path / "pool" / "a.qcow2")
    await create_image(host, raw, "raw", 64 * MiB)
    await create_image(host, qcow, "qcow2", 64 * MiB)

    for path, fmt in ((raw, "raw"), (qcow, "qcow2")):
        info = await image_info(host, path)
        assert (info.path, info.format, info.virtual_size) == (path, fmt, 64 * MiB)
        assert info.backing_file is None
        assert info.actual_size == _on_disk(Path(path))  # blocks, not apparent size
        assert 0 < info.actual_size <= 1 * MiB  # thin
        assert await allocated_bytes(host, path) == _on_disk(Path(path))
    assert os.stat(raw).st_size == 64 * MiB  # sparse, not short
    assert (await image_info(host, qcow, fmt="qcow2")).format == "qcow2"


@needs_qemu_img
async def test_create_refuses_overwrite(host: LocalHost, tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await create_image(host, str(path), "qcow2", 64 * MiB)
    before = path.read_bytes()
    with pytest.raises(ConflictError):
        await create_image(host, str(path), "raw", 1 * MiB)
    assert path.read_bytes() == before
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConflictError):
        await create_image(host, str(tmp_path / "dangling"), "raw", 1 * MiB)
    assert not (tmp_path / "nowhere").exists()


async def test_create_refuses_bad_arguments(host: LocalHost, tmp_path: Path) -> None:
    for args in (("rel.raw", "raw", MiB), (str(tmp_path / "z.raw"), "raw", 0),
                 (str(tmp_path / "z.vmdk"), "vmdk", MiB)):
        with pytest.raises(SpecError):
            await create_image(host, *args)
    assert _listing(tmp_path) == []


@needs_qemu_img
async def test_create_failure_leaves_no_file(host: LocalHost, tmp_path: Path) -> None:
    # a size qemu-img refuses (beyond its maximum) fails after the placeholder is made
    from vmigrate.errors import CommandError

    path = tmp_path / "huge.qcow2"
    with pytest.raises(CommandError):
        await create_image(host, str(path), "qcow2", 1 << 62)
    assert not path.exists()


@needs_qemu_img
async def test_write_convert_compare(host: LocalHost, tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    await create_image(host, str(raw), "raw", 64 * MiB)
    with raw.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(bytes(range(1, 256)) * (MiB // 255) + b"\x01" * (MiB % 255))
    assert _on_disk(raw) >= 1 * MiB
    info = await image_info(host, str(raw))
    assert info.actual_size == _on_disk(raw)

    qcow = tmp_path / "b.qcow2"
    await host.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)])
    assert await compare_images(host, str(raw), str(qcow))
    assert await compare_images(host, str(raw), str(qcow), fmt_a="raw", fmt_b="qcow2")
    # read as raw, the qcow2 file's bytes are not the guest's
    assert not await compare_images(host, str(raw), str(qcow), fmt_a="raw", fmt_b="raw")
    # arrived thin: the copy holds the written MiB plus metadata, not 64 MiB
    assert 1 * MiB <= await allocated_bytes(host, str(qcow)) <= 2 * MiB

    # the space estimate covers what qemu-img itself says the target needs
    res = await host.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", str(raw)])
    assert required_bytes(info, "qcow2") >= json.loads(res.stdout)["required"]

    with raw.open("r+b") as f:
        f.seek(60 * MiB)
        f.write(b"\x07")
    assert not await compare_images(host, str(raw), str(qcow))


@needs_qemu_img
async def test_missing_or_bad_image(host: LocalHost, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.qcow2")
    with pytest.raises(SpecError) as err:
        await image_info(host, missing)
    message = str(err.value)
    assert "\n" not in message and "ctl" in message and missing in message
    with pytest.raises(SpecError):
        await allocated_bytes(host, missing)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image")
    with pytest.raises(SpecError):
        await image_info(host, str(junk), fmt="qcow2")
    with pytest.raises(SpecError):
        await compare_images(host, str(junk), missing)
    with pytest.raises(SpecError):
        await image_info(host, "relative.qcow2")


async def test_remove_is_idempotent(host: LocalHost, tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(b"x")
    await remove_image(host, str(path))
    assert not path.exists()
    await remove_image(host, str(path))
    assert _listing(tmp_path) == []


async def test_free_bytes(host: LocalHost, tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    expected = st.f_bavail * st.f_frsize
    here = await free_bytes(host, str(tmp_path))
    later = await free_bytes(host, str(tmp_path / "not" / "yet"))
    assert here > 0 and later > 0
    for value in (here, later):  # other processes may write meanwhile
        assert abs(value - expected) <= 64 * MiB
    assert not (tmp_path / "not").exists()


async def test_missing_tool(tmp_path: Path) -> None:
    class NoQemuImg(LocalHost):
        async def _exec(self, argv, stdin, timeout):  # type: ignore[no-untyped-def]
            if argv[0] == "qemu-img":
                return 127, b"", b"qemu-img: command not found"
            return await super()._exec(argv, stdin, timeout)

    with pytest.raises(EnvironmentError_):
        await image_info(NoQemuImg("ctl"), str(tmp_path / "a"))
    with pytest.raises(EnvironmentError_):
        await create_image(NoQemuImg("ctl"), str(tmp_path / "a"), "raw", MiB)
    assert not (tmp_path / "a").exists()  # the placeholder went away again
