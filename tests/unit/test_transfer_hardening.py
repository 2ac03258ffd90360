"""The transfer receiver's least privilege, in process (no root): allowed directories,
no links followed, overwrite decided by the receiver, only an authenticated connection
becomes the session, and deadlines on a stalled stream (with resume)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_transfer_fuzz import Sink
from vmigrate.config import HostConfig
from vmigrate.errors import (
    ConflictError,
    TransferError,
    TransferIntegrityError,
    TransferStalledError,
    UserError,
)
from vmigrate.transfer import agent, engine, wire
from vmigrate.transfer.confine import (
    JOURNAL_SUFFIX,
    PARTIAL_SUFFIX,
    allowed_root,
    open_destination,
)
from vmigrate.transfer.disks import open_source
from vmigrate.transfer.engine import SendOptions, zero_id
from vmigrate.transfer.journal import Geometry, Journal
from vmigrate.transfer.remote import allowed_dirs, receiver_args

KiB, MiB = 1 << 10, 1 << 20
KEY = b"\x11" * 32
OTHER = b"\x22" * 32
CHUNK = 64 * KiB
OPTS = SendOptions(chunk_size=CHUNK, compress="off")


def run(coro: Any, limit: float = 60.0) -> Any:
    """``asyncio.run`` with a limit: a regression that hangs fails instead."""
    async def limited() -> Any:
        return await asyncio.wait_for(coro, limit)
    return asyncio.run(limited())


def image(path: Path, size: int = 2 * MiB) -> Path:
    """Random bytes with a hole in the middle."""
    with path.open("wb") as f:
        f.write(os.urandom(size // 2))
        f.truncate(size)
        f.seek(size - 256 * KiB)
        f.write(os.urandom(256 * KiB))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- where the receiver may write ---------------------------------------------------


@pytest.mark.parametrize("target", ["rel/x.raw", "/srv/a/../x.raw", "/srv//x.raw",
                                    "/srv/./x.raw", "/srv/x.raw/", "/srv/x\0.raw", "/"])
def test_targets_must_be_normalised_and_absolute(target: str) -> None:
    with pytest.raises(UserError):
        allowed_root(target, ["/srv"])


def test_target_outside_the_allowed_directories_is_refused() -> None:
    with pytest.raises(UserError):
        allowed_root("/etc/passwd", ["/srv/pool", "/var/lib/vmigrate/images"])
    with pytest.raises(UserError):  # a prefix of the name is not a parent
        allowed_root("/srv/pool2/x.raw", ["/srv/pool"])
    with pytest.raises(UserError):
        allowed_root("/srv/pool/x.raw" + PARTIAL_SUFFIX, ["/srv/pool"])
    with pytest.raises(UserError):  # an allowed directory must be normalised too
        allowed_root("/srv/pool/x.raw", ["/srv/pool/../etc"])
    _t, root, rel = allowed_root("/srv/pool/vm/a/x.raw", ["/srv", "/srv/pool"])
    assert (str(root), str(rel)) == ("/srv/pool", "vm/a")


def test_controller_checks_before_starting_and_passes_the_receivers_own_flags() -> None:
    cfg = HostConfig(name="h2", data_dir=Path("/var/lib/vmigrate"),
                     pools={"local": Path("/var/lib/vmigrate/images")},
                     transfer_dirs=[Path("/srv/incoming")])
    allowed = allowed_dirs(cfg)
    args = receiver_args("/srv/incoming/a.raw", allowed, SendOptions(overwrite=True))
    assert args == ["/srv/incoming/a.raw", "--allow-dir=/var/lib/vmigrate/images",
                    "--allow-dir=/srv/incoming", "--overwrite"]
    assert "--overwrite" not in receiver_args("/var/lib/vmigrate/images/b.raw", allowed,
                                              SendOptions())
    with pytest.raises(UserError):
        receiver_args("/root/.ssh/authorized_keys", allowed, SendOptions())


def test_a_symlinked_directory_below_the_allowed_one_is_not_followed(tmp_path: Path) -> None:
    pool, elsewhere = tmp_path / "pool", tmp_path / "elsewhere"
    pool.mkdir()
    elsewhere.mkdir()
    (pool / "vm").symlink_to(elsewhere)
    with pytest.raises(ConflictError):
        open_destination(str(pool / "vm" / "x.raw"), [str(pool)])
    with pytest.raises(UserError):
        open_destination(str(pool / "missing" / "x.raw"), [str(pool)])
    # the allowed directory's own path is the operator's: a link there is followed
    (tmp_path / "pool-link").symlink_to(pool)
    with open_destination(str(tmp_path / "pool-link" / "x.raw"),
                          [str(tmp_path / "pool-link")]) as dest:
        dest.check(overwrite=False)


def test_planted_links_devices_and_hard_links_are_refused_and_left_alone(
        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    pool = tmp_path / "pool"
    pool.mkdir()
    target = pool / "x.raw"
    plants: list[tuple[str, Callable[[Path], None]]] = [
        (suffix, plant) for suffix in (PARTIAL_SUFFIX, JOURNAL_SUFFIX)
        for plant in (lambda p: p.symlink_to(victim), lambda p: os.mkfifo(p),
                      lambda p: os.link(victim, p), lambda p: p.mkdir(),
                      lambda p: p.symlink_to(tmp_path / "dangling"))]
    for suffix, plant in plants:
        planted = Path(str(target) + suffix)
        plant(planted)
        with open_destination(str(target), [str(pool)]) as dest:
            with pytest.raises(ConflictError):
                dest.check(overwrite=False)
            with pytest.raises(ConflictError):
                dest.open_file(planted.name, create=True)
        assert os.path.lexists(planted)
        if planted.is_dir() and not planted.is_symlink():
            planted.rmdir()
        else:
            planted.unlink()
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / "dangling").exists()


def test_a_target_that_is_a_link_is_not_replaced_even_with_overwrite(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "x.raw").symlink_to(victim)
    with open_destination(str(pool / "x.raw"), [str(pool)]) as dest:
        with pytest.raises(ConflictError):
            dest.check(overwrite=False)
        with pytest.raises(ConflictError):
            dest.check(overwrite=True)
    assert victim.read_bytes() == b"precious"


def test_commit_never_replaces_a_target_that_appeared_without_overwrite(
        tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / ("x.raw" + PARTIAL_SUFFIX)).write_bytes(b"copy")
    (pool / "x.raw").write_bytes(b"someone else's")
    with open_destination(str(pool / "x.raw"), [str(pool)]) as dest:
        with pytest.raises(ConflictError):
            dest.commit(overwrite=False)
        assert (pool / "x.raw").read_bytes() == b"someone else's"
        assert (pool / ("x.raw" + PARTIAL_SUFFIX)).read_bytes() == b"copy"
        dest.commit(overwrite=True)
    assert (pool / "x.raw").read_bytes() == b"copy"
    assert not (pool / ("x.raw" + PARTIAL_SUFFIX)).exists()


# --- sessions in process ----------------------------------------------------------------


class Receiver:
    """A listening receiver in this event loop (agent._Acceptor, as the real one)."""

    def __init__(self, target: Path, *, key: bytes = KEY, overwrite: bool = False,
                 stall_s: float = 5.0) -> None:
        self.target = target
        self.key = key
        self.overwrite = overwrite
        self.stall_s = stall_s
        self.acceptor: agent._Acceptor | None = None

    async def start(self) -> int:
        self.acceptor = agent._Acceptor(self.key, self.stall_s)
        self.server = await asyncio.start_server(self.acceptor.on_conn, "127.0.0.1", 0)
        self.task = asyncio.create_task(self._run())
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _run(self) -> engine.ReceiveResult:
        assert self.acceptor is not None
        try:
            w, ch, hello = await asyncio.wait_for(asyncio.shield(self.acceptor.chosen), 20)
        finally:
            self.server.close()
            await self.acceptor.close()
        try:
            with open_destination(str(self.target), [str(self.target.parent)]) as dest:
                return await engine.receive_session(ch, hello, dest, overwrite=self.overwrite,
                                                    sock_dir=self.target.parent)
        finally:
            w.close()


async def send(port: int, src: Path, *, key: bytes = KEY, opts: SendOptions = OPTS,
               stall_s: float = 5.0) -> tuple[engine.Progress, dict[str, Any]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with open_source(src, "raw", sock_dir=src.parent) as source:
            p, done, _man = await engine.send(source, r, w, key, opts, stall_s=stall_s)
            return p, done
    finally:
        w.close()


async def copy(src: Path, dst: Path, **kw: Any) -> tuple[engine.ReceiveResult, engine.Progress]:
    rx = Receiver(dst, **{k: v for k, v in kw.items() if k in ("overwrite", "stall_s")})
    port = await rx.start()
    p, _done = await send(port, src, **{k: v for k, v in kw.items() if k in ("stall_s",)})
    return await rx.task, p


def test_copy_in_process_is_identical(tmp_path: Path) -> None:
    src, dst = image(tmp_path / "src.raw"), tmp_path / "out" / "dst.raw"
    dst.parent.mkdir()
    res, _p = run(copy(src, dst))
    assert digest(dst) == digest(src) and res.verified == "full"
    assert not list(dst.parent.glob("*.vmxfer-*"))


def test_overwrite_is_the_receivers_decision(tmp_path: Path) -> None:
    src = image(tmp_path / "src.raw")
    pool = tmp_path / "pool"
    pool.mkdir()
    dst = pool / "dst.raw"
    dst.write_bytes(b"keep me")

    async def go(overwrite: bool) -> None:
        rx = Receiver(dst, overwrite=overwrite)
        port = await rx.start()
        # the sender asks for an overwrite: it has no say
        results = await asyncio.gather(send(port, src, opts=SendOptions(
            chunk_size=CHUNK, overwrite=True)), rx.task, return_exceptions=True)
        if not overwrite:
            assert isinstance(results[1], ConflictError), results
            assert isinstance(results[0], TransferError), results
        else:
            assert not any(isinstance(r, BaseException) for r in results), results

    run(go(False))
    assert dst.read_bytes() == b"keep me"
    assert not list(pool.glob("*.vmxfer-*"))
    run(go(True))
    assert digest(dst) == digest(src)


def test_a_symlink_planted_with_a_journal_is_not_written_through(tmp_path: Path) -> None:
    src = image(tmp_path / "src.raw")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    pool = tmp_path / "pool"
    pool.mkdir()
    dst = pool / "dst.raw"
    # a journal that matches the image, so the receiver would resume through the link
    g = Geometry(src.stat().st_size, CHUNK, "raw")
    j, _ = Journal.open(Path(str(dst) + JOURNAL_SUFFIX), g, {CHUNK: zero_id(CHUNK)})
    j.record(0, b"x" * 32)
    j.sync()
    j.close()
    Path(str(dst) + PARTIAL_SUFFIX).symlink_to(victim)

    async def go() -> list[Any]:
        rx = Receiver(dst)
        port = await rx.start()
        return list(await asyncio.gather(send(port, src), rx.task, return_exceptions=True))

    results = run(go())
    assert isinstance(results[1], ConflictError), results
    assert victim.read_bytes() == b"precious" * 1000
    assert Path(str(dst) + PARTIAL_SUFFIX).is_symlink() and not dst.exists()


def test_only_an_authenticated_connection_becomes_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that come first (idle, garbage, the wrong key, a replay of a genuine
    sender's start) are dropped; the sender that holds the key gets the session."""
    monkeypatch.setattr(agent, "HANDSHAKE_S", 1.0)
    src = image(tmp_path / "src.raw")
    dst = tmp_path / "dst.raw"

    async def recorded_start() -> bytes:
        """What a genuine sender writes first (preamble and HELLO) on a connection."""
        got = bytearray()
        hello_seen = asyncio.Event()

        async def fake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got.extend(await r.readexactly(wire.PREAMBLE.size))
            w.write(wire.reply(0, os.urandom(wire.SALT_BYTES)))
            head = await r.readexactly(wire.HEADER.size)
            _k, _f, meta_len, sealed_len = wire.HEADER.unpack(head)
            got.extend(head + await r.readexactly(meta_len + sealed_len))
            hello_seen.set()
            w.close()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with contextlib.suppress(TransferError):
            await send(port, src)
        await hello_seen.wait()
        server.close()
        return bytes(got)

    async def go() -> tuple[engine.ReceiveResult, int]:
        replay = await recorded_start()
        rx = Receiver(dst)
        port = await rx.start()
        opened = []
        idle = await asyncio.open_connection("127.0.0.1", port)
        opened.append(idle[1])
        for junk in (os.urandom(64), replay):
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(junk)
            opened.append(w)
        wrong = asyncio.create_task(send(port, src, key=OTHER))
        with pytest.raises(TransferIntegrityError):
            await wrong
        await send(port, src)
        res = await rx.task
        for w in opened:
            w.close()
        assert rx.acceptor is not None
        return res, rx.acceptor.refused

    _res, refused = run(go())
    assert digest(dst) == digest(src)
    assert refused >= 3  # garbage, replay, wrong key (the idle one may still be pending)


def test_a_listening_receiver_gives_up_in_bounded_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "ACCEPT_S", 0.5)
    monkeypatch.setattr(agent, "HANDSHAKE_S", 0.5)
    events: list[dict[str, Any]] = []
    listening: list[asyncio.Event] = []

    def emit(event: str, **fields: Any) -> None:
        events.append({"event": event, **fields})
        if event == "listening":
            listening[0].set()

    monkeypatch.setattr(agent, "emit", emit)

    async def go(with_junk: bool) -> None:
        stdin = asyncio.StreamReader()  # the controller stays
        listening[:] = [asyncio.Event()]
        with open_destination(str(tmp_path / "x.raw"), [str(tmp_path)]) as dest:
            task = asyncio.create_task(agent.serve(
                dest, KEY, stdin, overwrite=False, listen="127.0.0.1:0", sock_dir=tmp_path,
                stall_s=1.0))
            await asyncio.wait_for(listening[0].wait(), 5)
            port = next(e["port"] for e in events if e["event"] == "listening")
            if with_junk:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
            t0 = time.monotonic()
            with pytest.raises(TransferError) as err:
                await task
            assert time.monotonic() - t0 < 2
            assert isinstance(err.value, TransferIntegrityError) == with_junk
        events.clear()

    run(go(False))
    run(go(True))
    assert not (tmp_path / "x.raw").exists()


# --- deadlines --------------------------------------------------------------------------


class Proxy:
    """Forwards TCP between a sender and a receiver until :meth:`cut`: then it stops
    moving bytes either way, holding both connections open (a cut cable)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.cut_at: float | None = None
        self._cut = asyncio.Event()
        self.moved = 0
        self.halfway = asyncio.Event()  # 3 MiB moved

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        self.cut_at = time.monotonic()
        self._cut.set()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            while not self._cut.is_set():
                data = await a.read(16 * KiB)
                if not data or self._cut.is_set():
                    break
                b.write(data)
                self.moved += len(data)
                if self.moved >= 3 * MiB:
                    self.halfway.set()
                await b.drain()
            await asyncio.sleep(3600)

        tasks = [asyncio.create_task(pump(r, uw)), asyncio.create_task(pump(ur, w))]
        self.tasks = tasks
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)

    def close(self) -> None:
        self.server.close()
        for t in getattr(self, "tasks", []):
            t.cancel()


def test_a_cut_link_fails_both_ends_within_the_deadline_and_the_rerun_resumes(
        tmp_path: Path) -> None:
    src = image(tmp_path / "src.raw", 8 * MiB)
    pool = tmp_path / "pool"
    pool.mkdir()
    dst = pool / "dst.raw"
    stall = 0.5
    slow = SendOptions(chunk_size=CHUNK, compress="off", bandwidth=4 * MiB, window=MiB)

    async def first() -> tuple[list[Any], list[float], float]:
        rx = Receiver(dst, stall_s=stall)
        proxy = Proxy(await rx.start())
        port = await proxy.start()
        ended: list[float] = [0.0, 0.0]

        async def timed(i: int, aw: Any) -> Any:
            try:
                return await aw
            finally:
                ended[i] = time.monotonic()

        tasks = [asyncio.create_task(timed(0, send(port, src, opts=slow, stall_s=stall))),
                 asyncio.create_task(timed(1, rx.task))]
        await asyncio.wait_for(proxy.halfway.wait(), 20)
        proxy.cut()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        proxy.close()
        assert proxy.cut_at is not None
        return results, ended, proxy.cut_at

    results, ended, cut_at = run(first())
    assert all(isinstance(r, TransferStalledError) for r in results), results
    for t in ended:
        assert t - cut_at < stall + 1.5, ended
    assert Path(str(dst) + PARTIAL_SUFFIX).exists() and not dst.exists()

    res, p = run(copy(src, dst))
    assert res.resumed
    assert digest(dst) == digest(src)
    assert p.skipped >= 2 * MiB  # what arrived before the cut is not sent again


def test_a_busy_receiver_keeps_a_waiting_sender_alive(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver verifies for three deadlines (1.5 s against 0.5 s); its PINGs keep
    the sender waiting."""
    verify = engine._Receiver._verify

    async def slow_verify(self: Any, *args: Any) -> None:
        await asyncio.sleep(1.5)
        await verify(self, *args)

    monkeypatch.setattr(engine._Receiver, "_verify", slow_verify)
    src, dst = image(tmp_path / "src.raw"), tmp_path / "dst.raw"
    _res, _p = run(copy(src, dst, stall_s=0.5))
    assert digest(dst) == digest(src)


def test_reads_and_writes_have_deadlines() -> None:
    class Never:
        async def read(self, n: int) -> bytes:
            await asyncio.sleep(3600)
            return b""

    class Stuck:
        class transport:
            @staticmethod
            def get_write_buffer_size() -> int:
                return 1 << 20

        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            await asyncio.sleep(3600)

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(TransferStalledError):
            await wire.read_exactly(Never(), 10, 0.2)
        with pytest.raises(TransferStalledError):
            await wire.drain(Stuck(), 0.2)
        assert time.monotonic() - t0 < 2

    run(go())


def test_keepalive_pings_are_skipped_by_the_reader() -> None:
    from vmigrate.transfer.crypto import FrameCipher


    async def go() -> None:
        cipher = FrameCipher("aes-256-gcm", KEY, b"s" * 32)
        sink = Sink()
        tx = wire.Channel(asyncio.StreamReader(), sink, cipher, me=wire.SENDER, stall_s=0.5)
        ka = asyncio.create_task(tx.keepalive(every=0.05))
        await asyncio.sleep(0.3)
        await tx.send(wire.Kind.END, b"end")
        ka.cancel()
        r = asyncio.StreamReader()
        r.feed_data(bytes(sink.data))
        r.feed_eof()
        rx = wire.Channel(r, Sink(), cipher, me=wire.RECEIVER)
        f = await rx.read_frame()
        assert f.kind == wire.Kind.END and rx.open(f) == b"end" and f.seq > 1

    run(go())


def test_the_controller_bounds_its_wait_for_the_second_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender failed; the receiver (still listening) is told to stop by closing its
    stdin, and killed if that does not end it."""
    from vmigrate.transfer import remote

    monkeypatch.setattr(remote, "OTHER_END_S", 0.2)

    class Stdin:
        def __init__(self, proc: Proc) -> None:
            self.proc = proc

        def write_eof(self) -> None:
            if self.proc.obeys_eof:
                self.proc.end(1)

    class Proc:
        def __init__(self, status: int | None, obeys_eof: bool) -> None:
            self.obeys_eof = obeys_eof
            self.ended = asyncio.get_running_loop().create_future()
            self.stdin = Stdin(self)
            self.killed = False
            if status is not None:
                self.end(status)

        def end(self, status: int) -> None:
            if not self.ended.done():
                self.ended.set_result(status)

        async def wait(self) -> int:
            status: int = await self.ended
            return status

        def kill(self) -> None:
            self.killed = True
            self.end(-9)

    class End:
        def __init__(self, name: str, proc: Proc) -> None:
            self.name = name
            self.proc = proc

    async def go(obeys: bool) -> tuple[list[int], bool]:
        snd, recv = Proc(6, True), Proc(None, obeys)
        t0 = time.monotonic()
        statuses = await remote._settle(End("sender", snd), End("receiver", recv))  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 2
        return statuses, recv.killed

    assert run(go(True)) == ([6, 1], False)
    assert run(go(False)) == ([6, -9], True)
