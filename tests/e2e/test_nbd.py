"""The asyncio NBD client against real qemu-nbd exports and a scripted fake server.

Every qemu-nbd is started by these tests through ``serve_image``/``NbdServer``
and stopped by its own PID in ``finally``; images and sockets live in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from vmigrate.errors import NbdError, StateError, UserError
from vmigrate.transfer import nbd
from vmigrate.transfer.nbd import (
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    ClientState,
    Extent,
    NbdClient,
    NbdServer,
    serve_image,
)

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("qemu-nbd", "qemu-img", "qemu-io")),
    reason="qemu-nbd, qemu-img and qemu-io (qemu-utils) are needed")


def sparse_raw(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False,
                          timeout=60)


def qemu_io(img: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, str(img)], capture_output=True, text=True, check=False,
                          timeout=60)


def state_of(client: NbdClient) -> ClientState:
    return client.state


def assert_covers(extents: list[Extent], offset: int, length: int) -> None:
    pos = offset
    for e in extents:
        assert e.offset == pos and e.length > 0
        pos = e.end
    assert pos == offset + length
    # adjacent extents are merged when their flags match
    assert all(a.flags != b.flags for a, b in itertools.pairwise(extents))


def flags_at(extents: list[Extent], offset: int, length: int) -> set[int]:
    return {e.flags for e in extents if e.offset < offset + length and e.end > offset}


# --- real qemu-nbd ---------------------------------------------------------------


@needs_qemu
async def test_raw_read_and_block_status(tmp_path: Path) -> None:
    size = 64 * MiB
    rng = random.Random(1)
    writes = {0: rng.randbytes(4096), 5 * MiB + 123: rng.randbytes(100_000),
              size - 4096: rng.randbytes(4096)}
    img = tmp_path / "a.raw"
    sparse_raw(img, size, writes)
    expect = img.read_bytes()
    async with serve_image(img, "raw", tmp_path / "a.sock") as addr, \
            await NbdClient.connect(addr) as client:
        assert addr == f"unix:{tmp_path / 'a.sock'}"
        assert client.size == size and client.read_only and client.state is ClientState.READY
        assert client.contexts == ["base:allocation"]
        # the whole device (two pieces at the 32 MiB limit), and unaligned spans
        assert await client.read(0, size) == expect
        for off, n in [(5 * MiB, 200_000), (5 * MiB + 123 + 99_990, 20), (4000, 200),
                       (size - 5000, 5000), (7, 1)]:
            assert await client.read(off, n) == expect[off:off + n], (off, n)
        assert await client.read(100, 0) == b""

        extents = await client.block_status(0, size)
        assert_covers(extents, 0, size)
        for off, data in writes.items():
            assert flags_at(extents, off, len(data)) == {0}, off  # allocated data
        for e in extents:
            if e.flags & NBD_STATE_ZERO:
                assert expect[e.offset:e.end].count(0) == e.length
        assert flags_at(extents, 10 * MiB, 40 * MiB) == {NBD_STATE_HOLE | NBD_STATE_ZERO}

        whole = [e async for e in client.extents()]
        assert whole == extents
        # a sub-range is clamped to exactly what was asked
        part = await client.block_status(5 * MiB + 1, 1000)
        assert_covers(part, 5 * MiB + 1, 1000)
        assert part == [Extent(5 * MiB + 1, 1000, NBD_STATE_HOLE | NBD_STATE_ZERO)] or \
            flags_at(part, 5 * MiB + 123, 100) == {0}

        with pytest.raises(UserError):
            await client.read(size - 10, 11)
        with pytest.raises(StateError):
            await client.write(0, b"x")  # read-only export
        with pytest.raises(UserError):
            await client.block_status(0, 10, context="qemu:dirty-bitmap:nope")
    assert not (tmp_path / "a.sock").exists()
    assert state_of(client) is ClientState.CLOSED
    await client.close()  # idempotent
    with pytest.raises(StateError):
        await client.read(0, 1)


@needs_qemu
async def test_qcow2_target_stays_thin(tmp_path: Path) -> None:
    size = 128 * MiB
    target, ref = tmp_path / "t.qcow2", tmp_path / "ref.raw"
    assert qemu_img("create", "-q", "-f", "qcow2", str(target), str(size)).returncode == 0
    sparse_raw(ref, size, {})
    rng = random.Random(2)
    big = rng.randbytes(40 * MiB)  # larger than one request: split
    async with serve_image(target, "qcow2", tmp_path / "t.sock", read_only=False) as addr, \
            await NbdClient.connect(addr) as client:
        assert not client.read_only and client.can_write_zeroes and client.can_flush
        plan: list[tuple[str, int, bytes | int]] = [
            ("write", 0, rng.randbytes(MiB)),
            ("write", 8 * MiB, rng.randbytes(3 * MiB)),
            ("zero", 9 * MiB, MiB),  # punch inside data: must end unallocated/zero
            ("write", 20 * MiB, big),
            ("zero", 64 * MiB, 4 * MiB),  # zeroing never-written space allocates nothing
            ("write", 100 * MiB + 7, rng.randbytes(100)),
        ]
        with ref.open("r+b") as f:
            for op, off, arg in plan:
                f.seek(off)
                if op == "write":
                    assert isinstance(arg, bytes)
                    await client.write(off, arg, fua=off == 100 * MiB + 7)
                    f.write(arg)
                else:
                    assert isinstance(arg, int)
                    await client.write_zeroes(off, arg)
                    f.write(bytes(arg))
            await client.write_zeroes(30 * MiB, 64 * 1024, may_trim=False)  # stays allocated
            f.seek(30 * MiB)
            f.write(bytes(64 * 1024))
            # whole clusters discarded from a qcow2 without backing file read as zeros
            await client.trim(10 * MiB, MiB)
            f.seek(10 * MiB)
            f.write(bytes(MiB))
        await client.flush()
        expect = ref.read_bytes()
        assert await client.read(0, size) == expect
        status = await client.block_status(9 * MiB, MiB)
        assert all(e.flags & NBD_STATE_ZERO for e in status)

    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(ref), str(target))
    assert res.returncode == 0, res.stdout + res.stderr
    res = qemu_img("map", "--output=json", "-f", "qcow2", str(target))
    assert res.returncode == 0, res.stderr
    mapping = json.loads(res.stdout)
    for start, length in [(9 * MiB, 2 * MiB), (64 * MiB, 4 * MiB)]:
        covering = [m for m in mapping
                    if m["start"] < start + length and m["start"] + m["length"] > start]
        assert covering and all(not m["data"] and m["zero"] for m in covering), covering
    data = [m for m in mapping if m["data"]]
    assert sum(m["length"] for m in data) < 50 * MiB  # thin: only what was written


@needs_qemu
async def test_dirty_bitmap(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), "64M").returncode == 0
    assert qemu_img("bitmap", "--add", "--enable", str(img), "b0").returncode == 0
    io = qemu_io(img, "write -P 0x55 1M 64k", f"write -P 0x66 {3 * MiB + 100} 1000",
                 "write -P 0x77 10M 200k")
    assert io.returncode == 0, io.stderr
    gran = 64 * 1024  # qemu's default bitmap granularity for 64 KiB clusters
    dirty = [(MiB, gran), (3 * MiB, gran), (10 * MiB, 4 * gran)]
    ctx = "qemu:dirty-bitmap:b0"
    async with serve_image(img, "qcow2", tmp_path / "b.sock", bitmap="b0") as addr, \
            await NbdClient.connect(addr, meta_contexts=("base:allocation", ctx)) as client:
        assert set(client.contexts) == {"base:allocation", ctx}
        extents = await client.block_status(0, client.size, context=ctx)
        assert_covers(extents, 0, client.size)
        assert [(e.offset, e.length) for e in extents if e.flags & NBD_STATE_DIRTY] == dirty
        assert [e async for e in client.extents(ctx)] == extents
        alloc = await client.block_status(0, client.size)
        assert flags_at(alloc, MiB, gran) == {0}
        assert await client.read(MiB, gran) == b"\x55" * gran

    # a context the export does not offer is refused at connect
    async with serve_image(img, "qcow2", tmp_path / "b.sock") as addr:
        with pytest.raises(NbdError):
            await NbdClient.connect(addr, meta_contexts=("base:allocation", ctx))


@needs_qemu
async def test_concurrent_reads(tmp_path: Path) -> None:
    size = 96 * MiB
    rng = random.Random(3)
    img = tmp_path / "c.raw"
    sparse_raw(img, size, {i * 3 * MiB: rng.randbytes(MiB + 17) for i in range(32)})
    expect = img.read_bytes()
    spans = [(rng.randrange(size - 4 * MiB), rng.randrange(1, 4 * MiB)) for _ in range(31)]
    spans.append((MiB, 40 * MiB))  # one split read among them
    async with serve_image(img, "raw", tmp_path / "c.sock") as addr, \
            await NbdClient.connect(addr) as client:
        got = await asyncio.gather(*(client.read(o, n) for o, n in spans))
        assert [g == expect[o:o + n] for g, (o, n) in zip(got, spans, strict=True)] == \
            [True] * len(spans)
        assert not client._pending


@needs_qemu
async def test_server_killed_mid_session(tmp_path: Path) -> None:
    img = tmp_path / "k.raw"
    sparse_raw(img, 16 * MiB, {0: b"k" * 4096})
    server = await NbdServer.start(img, "raw", tmp_path / "k.sock")
    try:
        client = await NbdClient.connect(server.address)
        assert await client.read(0, 4) == b"kkkk"
        os.kill(server.pid, signal.SIGSTOP)  # replies cannot come: the calls stay pending
        pending = [asyncio.create_task(client.read(i * MiB, MiB)) for i in range(4)]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in pending)
        os.kill(server.pid, signal.SIGKILL)
        results = await asyncio.wait_for(
            asyncio.gather(*pending, return_exceptions=True), 10)
        assert all(isinstance(r, NbdError) for r in results), results
        assert client.state is ClientState.BROKEN
        with pytest.raises(NbdError):
            await asyncio.wait_for(client.read(0, 4), 10)
        with pytest.raises(NbdError):
            await asyncio.wait_for(client.block_status(0, MiB), 10)
        await client.close()
        assert client.state is ClientState.BROKEN
    finally:
        if server.proc.returncode is None:  # a failure left it stopped: let SIGTERM work
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGCONT)
        await server.stop()
    assert server.proc.returncode is not None and not (tmp_path / "k.sock").exists()


async def test_connect_failures(tmp_path: Path) -> None:
    with pytest.raises(NbdError):
        await NbdClient.connect(f"unix:{tmp_path / 'none.sock'}", timeout=5)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NbdError):
        await NbdClient.connect(f"tcp:127.0.0.1:{port}", timeout=5)
    for bad in ("nbd://x", "tcp:127.0.0.1", "tcp:host:99999", "unix:"):
        with pytest.raises(UserError):
            await NbdClient.connect(bad)


@needs_qemu
async def test_qemu_nbd_start_failure(tmp_path: Path) -> None:
    with pytest.raises(NbdError) as info:
        async with serve_image(tmp_path / "absent.qcow2", "qcow2", tmp_path / "f.sock"):
            pass
    assert "absent.qcow2" in str(info.value)  # qemu-nbd's own stderr is carried
    assert not (tmp_path / "f.sock").exists()


@needs_qemu
async def test_large_sparse_image(tmp_path: Path) -> None:
    size = 8 << 30
    img = tmp_path / "big.raw"
    sparse_raw(img, size, {5 << 30: b"d" * 4096, size - 4096: b"e" * 4096})
    async with serve_image(img, "raw", tmp_path / "big.sock") as addr, \
            await NbdClient.connect(addr) as client:
        t0 = time.monotonic()
        extents = await client.block_status(0, size)
        assert time.monotonic() - t0 < 10
        assert sum(e.length for e in extents) == size
        assert_covers(extents, 0, size)
        assert [e for e in extents if e.flags == 0] == [
            Extent(5 << 30, 4096, 0), Extent(size - 4096, 4096, 0)]
        assert sum([e.length async for e in client.extents()]) == size
        assert await client.read((5 << 30) - 2, 4) == b"\0\0dd"


# --- a scripted fake server: replies the real qemu-nbd never sends -------------

Handler = Callable[[asyncio.StreamWriter, int, int, int, int], Awaitable[None]]
SIZE = 1 * MiB


def chunk(handle: int, ctype: int, payload: bytes, *, done: bool = False) -> bytes:
    return struct.pack(">IHHQI", nbd.NBD_STRUCTURED_REPLY_MAGIC,
                       nbd.NBD_REPLY_FLAG_DONE if done else 0, ctype, handle,
                       len(payload)) + payload


def data_chunk(handle: int, offset: int, data: bytes, *, done: bool = False) -> bytes:
    return chunk(handle, nbd.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data,
                 done=done)


def hole_chunk(handle: int, offset: int, length: int, *, done: bool = False) -> bytes:
    return chunk(handle, nbd.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length),
                 done=done)


def simple(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", nbd.NBD_SIMPLE_REPLY_MAGIC, error, handle)


@asynccontextmanager
async def fake_nbd(tmp_path: Path, handler: Handler, *, greeting: bytes | None = None,
                   tcp: bool = False) -> AsyncIterator[str]:
    """A newstyle server with one export of SIZE bytes and context base:allocation
    (id 7); each request goes to ``handler(writer, cmd, handle, offset, length)``."""
    path = str(tmp_path / "fake.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(opt: int, rtype: int, data: bytes = b"") -> None:
            writer.write(struct.pack(">QIII", nbd.NBD_REP_MAGIC, opt, rtype, len(data)) + data)

        try:
            if greeting is not None:
                writer.write(greeting)
                await writer.drain()
                return
            writer.write(struct.pack(">QQH", nbd.NBD_MAGIC, nbd.NBD_IHAVEOPT, 3))
            await reader.readexactly(4)
            while True:
                _, opt, n = struct.unpack(">QII", await reader.readexactly(16))
                await reader.readexactly(n)
                if opt == nbd.NBD_OPT_STRUCTURED_REPLY:
                    reply(opt, nbd.NBD_REP_ACK)
                elif opt == nbd.NBD_OPT_SET_META_CONTEXT:
                    reply(opt, nbd.NBD_REP_META_CONTEXT, struct.pack(">I", 7) +
                          b"base:allocation")
                    reply(opt, nbd.NBD_REP_ACK)
                elif opt == nbd.NBD_OPT_GO:
                    reply(opt, nbd.NBD_REP_INFO, struct.pack(">HQH", 0, SIZE, 0x1 | 0x2 | 0x4))
                    reply(opt, nbd.NBD_REP_ACK)
                    break
            while True:
                head = await reader.readexactly(28)
                _, _, cmd, handle, offset, length = struct.unpack(">IHHQQI", head)
                if cmd == nbd.NBD_CMD_DISC:
                    return
                await handler(writer, cmd, handle, offset, length)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    if tcp:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        address = f"tcp:127.0.0.1:{port}"
    else:
        server = await asyncio.start_unix_server(serve, path)
        address = f"unix:{path}"
    try:
        yield address
    finally:
        server.close()
        await server.wait_closed()


async def test_bad_greeting_is_nbd_error(tmp_path: Path) -> None:
    async def never(*_: object) -> None:
        raise AssertionError

    async with fake_nbd(tmp_path, never, greeting=b"NBDMAGIC" + b"\0" * 10) as addr:
        with pytest.raises(NbdError):
            await NbdClient.connect(addr, timeout=5)
    async with fake_nbd(tmp_path, never, greeting=b"HTTP/1.1 200 OK\r\n") as addr:
        with pytest.raises(NbdError):
            await NbdClient.connect(addr, timeout=5)


async def test_split_chunks_out_of_order_and_errors(tmp_path: Path) -> None:
    """Data in several chunks, out of order, with holes; replies out of order;
    an error chunk fails only its request; a cancelled call leaves the link usable."""
    held: list[tuple[int, int, int]] = []

    async def handler(w: asyncio.StreamWriter, cmd: int, handle: int, off: int, n: int) -> None:
        if cmd == nbd.NBD_CMD_READ and off == 0:  # hold two reads, answer them reversed
            held.append((handle, off, n))
            if len(held) < 2:
                return
            for h, o, m in reversed(held):
                half = m // 2
                w.write(data_chunk(h, o + half, bytes([1]) * (m - half - 3)))
                w.write(hole_chunk(h, o + m - 3, 3))
                w.write(data_chunk(h, o, bytes([2]) * half, done=True))
            held.clear()
        elif cmd == nbd.NBD_CMD_READ and off == 4096:
            w.write(chunk(handle, nbd.NBD_REPLY_TYPE_ERROR_OFFSET,
                          struct.pack(">IH", 5, 4) + b"oops" + struct.pack(">Q", 4100)))
            w.write(chunk(handle, nbd.NBD_REPLY_TYPE_NONE, b"", done=True))
        elif cmd == nbd.NBD_CMD_READ and off == 8192:
            await asyncio.sleep(0.3)  # the caller gives up before this arrives
            w.write(data_chunk(handle, off, b"late" * (n // 4), done=True))
        elif cmd == nbd.NBD_CMD_BLOCK_STATUS:
            # short of the request first; the last extent overshoots the end
            step = min(n, 100_000)
            w.write(chunk(handle, nbd.NBD_REPLY_TYPE_BLOCK_STATUS,
                          struct.pack(">IIIII", 7, step // 2, 3, step, 0), done=True))
        elif cmd == nbd.NBD_CMD_FLUSH:
            w.write(simple(handle))
        else:
            w.write(simple(handle, 22))

    async with fake_nbd(tmp_path, handler) as addr, \
            await NbdClient.connect(addr, timeout=5) as client:
        assert client.size == SIZE and client.read_only and client.can_flush
        a, b = await asyncio.gather(client.read(0, 10), client.read(0, 20))
        assert a == b"\2" * 5 + b"\1" * 2 + b"\0" * 3
        assert b == b"\2" * 10 + b"\1" * 7 + b"\0" * 3
        with pytest.raises(NbdError) as info:
            await client.read(4096, 16)
        assert info.value.errno == 5 and info.value.errno_name == "EIO"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.read(8192, 8), 0.05)
        await client.flush()  # the late reply was consumed, the link is in step
        extents = await client.block_status(1000, 250_000)
        assert_covers(extents, 1000, 250_000)
        # first reply short of the request (the client asks again from where it
        # ended), the second's last extent overshoots and is clamped
        assert extents == [Extent(1000, 50_000, 3), Extent(51_000, 100_000, 0),
                           Extent(151_000, 50_000, 3), Extent(201_000, 50_000, 0)]
        assert client.state is ClientState.READY


async def test_garbage_reply_breaks_connection(tmp_path: Path) -> None:
    cases: list[Callable[[int, int, int], bytes]] = [
        lambda h, o, n: struct.pack(">IIQ", 0xDEADBEEF, 0, h),  # bad magic
        lambda h, o, n: simple(h + 1000),  # unknown handle
        lambda h, o, n: data_chunk(h, o + n, b"x", done=True),  # data outside the request
        lambda h, o, n: data_chunk(h, o, b"x" * (n - 1), done=True),  # short read
        lambda h, o, n: hole_chunk(h, o, n, done=False) + hole_chunk(h, o, 1, done=True),
        lambda h, o, n: chunk(h, 77, b"", done=True),  # unknown chunk type
        lambda h, o, n: simple(h),  # simple success to a read under structured replies
    ]
    for make in cases:
        async def handler(w: asyncio.StreamWriter, cmd: int, handle: int, off: int, n: int,
                          make: Callable[[int, int, int], bytes] = make) -> None:
            w.write(make(handle, off, n))

        async with fake_nbd(tmp_path, handler) as addr:
            client = await NbdClient.connect(addr, timeout=5)
            try:
                with pytest.raises(NbdError):
                    await asyncio.wait_for(client.read(64, 16), 5)
                assert client.state is ClientState.BROKEN
                with pytest.raises(NbdError):
                    await client.read(64, 16)
            finally:
                await client.close()


async def test_tcp_address(tmp_path: Path) -> None:
    async def handler(w: asyncio.StreamWriter, cmd: int, handle: int, off: int, n: int) -> None:
        w.write(data_chunk(handle, off, b"t" * n, done=True))

    async with fake_nbd(tmp_path, handler, tcp=True) as addr, \
            await NbdClient.connect(addr, timeout=5) as client:
        assert addr.startswith("tcp:127.0.0.1:")
        assert await client.read(10, 3) == b"ttt"
