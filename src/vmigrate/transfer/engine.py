"""The transfer pipeline, sender and receiver, in one place.

Sender, per chunk of the fixed grid (``chunk_size``, 1 MiB by default)::

    allocation map / dirty bitmap -> read -> BLAKE3 id -> all zeros? -> ZERO frame
                                  -> already on the receiver (same id)? -> skip
                                  -> zstd (adaptive, skipped when it does not pay)
                                  -> AES-256-GCM (or SM4-GCM), index+length+id as AAD
                                  -> frame -> window / bandwidth cap -> stream

Receiver, per frame: authenticate and decrypt -> decompress -> check the id ->
write -> journal (``journal.py``) -> acknowledge. A frame that fails to
authenticate is answered with a NACK and sent again (at most ``MAX_RETRIES``
times; then the stream is taken as altered and the transfer fails). Every
``COMMIT_S`` seconds the target and the journal are made durable.

Resume: the receiver opens with a STATE frame listing the chunk ids it
already holds; the sender reads its chunk, and skips it when the ids match.
So a transfer killed anywhere (either side, the link, the controller) resends
at most the chunks that were in flight.

End: the sender sends the id of every chunk; the receiver checks its journal
against them, re-reads the whole copy and hashes it (``verify="full"``), and
only then renames ``<dst>.vmxfer-partial`` to ``<dst>``. An incremental round
(``final=False``) only commits; the last round verifies and renames.

Least privilege: the receiver takes a connection as its sender only once its
HELLO authenticates (:func:`handshake`), writes only through a
:class:`~vmigrate.transfer.confine.Destination` (an allowed directory, no link
followed, only regular files of its own), replaces an existing target only when
its own invocation says so, and every read and write of the stream has a
deadline (:mod:`~vmigrate.transfer.wire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import blake3
import zstandard

from vmigrate.errors import (
    StateError,
    TransferError,
    TransferIntegrityError,
    TransferStalledError,
    UserError,
)
from vmigrate.progress import Event, ProgressFn, guarded
from vmigrate.transfer import wire
from vmigrate.transfer.confine import JOURNAL_SUFFIX, PARTIAL_SUFFIX, Destination
from vmigrate.transfer.crypto import AuthError, FrameCipher, available_ciphers
from vmigrate.transfer.disks import FORMATS, Range, Source, Target, open_target
from vmigrate.transfer.journal import Geometry, Journal
from vmigrate.transfer.wire import Channel, Frame, Kind

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1 << 20
MAX_RETRIES: Final = 3
COMMIT_S: Final = 1.0
READ_AHEAD: Final = 16
__all__ = ["CHUNK_SIZE", "JOURNAL_SUFFIX", "PARTIAL_SUFFIX", "ReceiveResult", "SendOptions",
           "handshake", "receive", "receive_session", "send"]
Verify = Literal["full", "journal"]


def chunk_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


_ZERO_IDS: dict[int, bytes] = {}


def zero_id(length: int) -> bytes:
    """The id of ``length`` zero bytes (cached: every image has at most two lengths)."""
    if length not in _ZERO_IDS:
        _ZERO_IDS[length] = chunk_id(bytes(length))
    return _ZERO_IDS[length]


def image_digest(ids: Sequence[bytes]) -> bytes:
    """The whole image's digest: BLAKE3 over its chunk ids in order."""
    h = blake3.blake3()
    for i in ids:
        h.update(i)
    return h.digest()


# --- shared pieces -----------------------------------------------------------


@dataclass
class Progress:
    """What a transfer has done so far (bytes of the image, not of the wire): a running
    tally, handed to progress callbacks as an :class:`~vmigrate.progress.Event`
    (:meth:`event`)."""

    total: int
    done: int = 0
    wire: int = 0
    sent: int = 0       # image bytes sent as data
    zero: int = 0       # image bytes sent as zero ranges
    skipped: int = 0    # image bytes the receiver already held
    resent: int = 0     # image bytes sent again after a NACK
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "wire_bytes": self.wire,
                "data_bytes": self.sent, "zero_bytes": self.zero,
                "skipped_bytes": self.skipped, "resent_bytes": self.resent,
                "seconds": round(self.elapsed, 3)}

    def event(self) -> Event:
        """The tally as a progress event: image bytes ``done`` of ``total``, and the
        other counts of :meth:`as_dict` in ``figures`` under the same names
        (``wire_bytes``, ``data_bytes``, ``zero_bytes``, ``skipped_bytes``,
        ``resent_bytes``, ``seconds``)."""
        figures = self.as_dict()
        done, total = figures.pop("done"), figures.pop("total")
        return Event(done=done, total=total, figures=figures)


class TokenBucket:
    """A bandwidth cap in bytes per second (None: no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._t = time.monotonic()
        self._debt = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._debt = max(0.0, self._debt - (now - self._t) * self.rate) + n
        self._t = now
        wait = (self._debt - self.rate * 0.05) / self.rate  # 50 ms of burst
        if wait > 0:
            await asyncio.sleep(wait)


class Compressor:
    """zstd with a level that follows the bottleneck, and no effort on data that
    does not compress (one chunk in 16 is still tried)."""

    LEVELS: Final = (-5, -1, 1, 3, 6, 9)

    def __init__(self, mode: str) -> None:
        self.enabled = mode != "off"
        self._fixed = int(mode) if mode not in ("off", "auto") else None
        self._i = 3
        self._misses = 0
        self._n = 0
        self._local = threading.local()  # a ZstdCompressor is not thread-safe

    @property
    def level(self) -> int:
        return self._fixed if self._fixed is not None else self.LEVELS[self._i]

    def compress(self, data: bytes) -> bytes | None:
        """Compressed bytes, or None when sending ``data`` as it is is better."""
        if not self.enabled:
            return None
        self._n += 1
        if self._misses >= 8 and self._n % 16:
            return None
        lvl = self.level
        cctx: dict[int, zstandard.ZstdCompressor] = self._local.__dict__.setdefault("c", {})
        if lvl not in cctx:
            cctx[lvl] = zstandard.ZstdCompressor(level=lvl)
        out = cctx[lvl].compress(data)
        if len(out) > len(data) * 0.95:
            self._misses += 1
            return None
        self._misses = 0
        return out

    def adapt(self, cpu_bound: bool) -> None:
        """Lower the level when the sender waits for compression, raise it when it
        waits for the link."""
        if self._fixed is not None:
            return
        if cpu_bound and self._i > 0:
            self._i -= 1
        elif not cpu_bound and self._i < len(self.LEVELS) - 1:
            self._i += 1


def _pack_ids(ids: dict[int, bytes]) -> bytes:
    rec = struct.Struct(">Q32s")
    raw = b"".join(rec.pack(i, h) for i, h in sorted(ids.items()))
    return zstandard.ZstdCompressor(level=1).compress(raw)


def _unpack_ids(data: bytes, chunks: int) -> dict[int, bytes]:
    """A STATE frame's chunk ids, for an image of ``chunks`` chunks."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=40 * chunks + 40)
    except zstandard.ZstdError as exc:
        raise TransferIntegrityError("STATE frame does not decompress") from exc
    if len(raw) % 40 or len(raw) > 40 * chunks:
        raise TransferIntegrityError("STATE frame has a torn record or too many")
    out = {i: h for i, h in struct.iter_unpack(">Q32s", raw)}
    if any(i >= chunks for i in out):
        raise TransferIntegrityError("STATE frame names a chunk outside the image")
    return out


def _seqs(value: Any, what: str) -> set[int]:
    """A list of frame numbers from an ACK; :class:`TransferIntegrityError` otherwise."""
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TransferIntegrityError(f"ACK frame's {what} is not a list of frame numbers")
    return set(value)


# --- sender ------------------------------------------------------------------


@dataclass(frozen=True)
class SendOptions:
    target_format: str = "raw"
    chunk_size: int = CHUNK_SIZE
    cipher: str = "aes-256-gcm"
    compress: str = "auto"            # auto | off | a zstd level
    bandwidth: float | None = None    # bytes per second
    window: int = 16 << 20            # bytes in flight, unacknowledged
    verify: Verify = "full"
    final: bool = True                # False: an incremental round, no rename
    #: replace an existing target: the controller passes it to the *receiver's*
    #: invocation (``--overwrite``); the stream never carries it
    overwrite: bool = False


@dataclass(frozen=True)
class _Item:
    index: int
    count: int = 1                     # > 1 only for zero runs
    zero: bool = False                 # known zeros from the allocation map
    pieces: tuple[Range, ...] = ()     # dirty parts (delta); empty = whole chunk


@dataclass
class _Ready:
    item: _Item
    kind: Kind
    meta: bytes
    payload: bytes
    flags: int
    image_bytes: int


class Manifest:
    """The sender's chunk ids, kept across the rounds of a warm migration in a
    file next to nothing the receiver sees (``VMXMANI\\0`` v1, size, chunk size,
    ids)."""

    HEAD: Final = struct.Struct(">8sBQI")

    def __init__(self, geometry: Geometry, ids: list[bytes] | None = None) -> None:
        self.geometry = geometry
        self.ids: list[bytes] = ids or [b""] * geometry.chunks()

    @classmethod
    def load(cls, path: Path, geometry: Geometry) -> Manifest:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TransferError(f"cannot read manifest {path}: {exc}") from exc
        magic, version, size, chunk = cls.HEAD.unpack_from(data)
        n = geometry.chunks()
        if (magic, version, size, chunk) != (b"VMXMANI\0", 1, geometry.size,
                                             geometry.chunk_size) \
                or len(data) != cls.HEAD.size + 32 * n:
            raise TransferError(f"manifest {path} is not for this image")
        body = data[cls.HEAD.size:]
        return cls(geometry, [body[i * 32:(i + 1) * 32] for i in range(n)])

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.HEAD.pack(b"VMXMANI\0", 1, self.geometry.size,
                                       self.geometry.chunk_size) + b"".join(self.ids))
        tmp.replace(path)


def _plan_full(alloc: list[Range], g: Geometry) -> list[_Item]:
    """One item per chunk holding data, one per run of chunks known to be zero."""
    zero = bytearray(g.chunks())  # 1 where the whole chunk is a zero range
    for r in alloc:
        if not r.zero:
            continue
        first = -(-r.offset // g.chunk_size)
        end = r.offset + r.length
        last = end // g.chunk_size if end < g.size else g.chunks()
        for i in range(first, last):
            zero[i] = 1
    items: list[_Item] = []
    i = 0
    while i < len(zero):
        if zero[i]:
            j = i
            while j < len(zero) and zero[j]:
                j += 1
            items.append(_Item(i, j - i, zero=True))
            i = j
        else:
            items.append(_Item(i))
            i += 1
    return items


def _plan_delta(dirty: list[Range], g: Geometry) -> list[_Item]:
    """One item per chunk the dirty ranges touch, carrying the parts inside it."""
    parts: dict[int, list[Range]] = {}
    for r in dirty:
        pos, end = r.offset, min(r.offset + r.length, g.size)
        while pos < end:
            i = pos // g.chunk_size
            stop = min(end, (i + 1) * g.chunk_size)
            parts.setdefault(i, []).append(Range(pos - i * g.chunk_size, stop - pos))
            pos = stop
    return [_Item(i, pieces=tuple(p)) for i, p in sorted(parts.items())]


class Sender:
    """Sends one image (or one round of it) over one stream."""

    def __init__(self, source: Source, reader: wire.ByteReader, writer: wire.ByteWriter,
                 key: bytes, opts: SendOptions, *, progress: ProgressFn | None = None,
                 depth: int = 6, stall_s: float = wire.STALL_S) -> None:
        if opts.cipher not in available_ciphers():
            raise UserError(f"cipher {opts.cipher} is not available here; "
                            f"available: {', '.join(available_ciphers())}")
        self.source = source
        self.reader = reader
        self.writer = writer
        self.opts = opts
        self.g = Geometry(source.size, opts.chunk_size, opts.target_format)
        self.p = Progress(source.size)
        self._progress_fn = guarded(progress) if progress is not None else None
        self._last_progress = 0.0
        self.depth = depth
        self.comp = Compressor(opts.compress)
        self.bucket = TokenBucket(opts.bandwidth)
        self._inflight: dict[int, tuple[_Item, int]] = {}
        self._inflight_bytes = 0
        self._resend: deque[_Item] = deque()
        self._retries: dict[int, int] = {}
        self._changed = asyncio.Event()
        self._done: asyncio.Future[dict[str, Any]] | None = None
        self._waits = [0.0, 0.0]  # time waiting for CPU work, for the window/link
        self._salt = os.urandom(wire.SALT_BYTES)
        self._key = key
        self.stall_s = stall_s
        self.ch: Channel  # set once the receiver answered (its salt is in the key)

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._progress_fn and (force or now - self._last_progress >= 0.25):
            self._last_progress = now
            self.p.wire = self.ch.wire_out
            self._progress_fn(self.p.event())

    async def run(self, manifest: Manifest | None = None,
                  dirty: list[Range] | None = None) -> tuple[Progress, dict[str, Any], Manifest]:
        """Send; returns (progress, the receiver's DONE, the updated manifest).

        ``dirty`` makes this an incremental round: only those ranges (and chunks
        the receiver lacks) are sent; ``manifest`` must then hold the ids of
        the previous rounds. Raises :class:`TransferError` (the receiver keeps
        what it committed) or :class:`TransferIntegrityError`."""
        try:
            self.writer.write(wire.preamble(self.opts.cipher, self._salt))
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise TransferError("the receiver closed the transfer stream") from exc
        await wire.drain(self.writer, self.stall_s)
        their_salt = await wire.read_reply(self.reader, self.stall_s)
        self.ch = Channel(self.reader, self.writer,
                          FrameCipher(self.opts.cipher, self._key, self._salt + their_salt),
                          me=wire.SENDER, stall_s=self.stall_s)
        await self.ch.send_json(Kind.HELLO, {
            "size": self.g.size, "chunk_size": self.g.chunk_size, "format": self.g.fmt,
            "final": self.opts.final, "verify": self.opts.verify,
            "delta": dirty is not None,
        })
        keepalive = asyncio.create_task(self.ch.keepalive())
        try:
            return await self._session(manifest, dirty)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _session(self, manifest: Manifest | None, dirty: list[Range] | None
                       ) -> tuple[Progress, dict[str, Any], Manifest]:
        try:
            first = await self.ch.read_frame()
        except TransferStalledError:
            raise
        except TransferIntegrityError:
            raise
        except TransferError as exc:
            raise TransferIntegrityError(
                "the receiver closed the connection after our HELLO: it did not "
                "authenticate (wrong key?), or it stopped") from exc
        self._raise_if_error(first)
        if first.kind != Kind.STATE:
            raise TransferIntegrityError(f"expected STATE, got {first.kind.name}")
        try:
            have = _unpack_ids(self.ch.open(first), self.g.chunks())
        except AuthError as exc:
            raise TransferIntegrityError(
                "the receiver's reply does not authenticate: wrong key or altered stream"
            ) from exc
        if manifest is None:
            if dirty is not None:
                raise TransferError("an incremental round needs the manifest of the base copy")
            manifest = Manifest(self.g)
        if dirty is None:
            items = _plan_full(await self.source.allocation(), self.g)
        else:
            items = _plan_delta(dirty, self.g)
            touched = {it.index for it in items}
            # chunks the receiver lacks or holds differently: send whole
            items += [_Item(i) for i in range(self.g.chunks())
                      if i not in touched and have.get(i) != manifest.ids[i]]
            items.sort(key=lambda it: it.index)
        items = self._drop_held_zeros(items, have, manifest)
        self.p.total = sum(self._item_bytes(it) for it in items)
        acks = asyncio.create_task(self._read_acks())
        try:
            work = asyncio.create_task(self._send_all(items, have, manifest))
            waiters: list[asyncio.Future[Any]] = [work, acks]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the ack reader ended first: the receiver failed
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                acks.result()
                raise TransferError("the receiver stopped acknowledging")
            work.result()
            ends = struct.pack(">B32s", 1 if self.opts.final else 0, image_digest(manifest.ids))
            await self.ch.send(Kind.END, ends + b"".join(manifest.ids))
            self._done = asyncio.get_running_loop().create_future()
            done = await self._await_done(acks)
        finally:
            if not acks.done():
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransferError):
                    await acks
        self.p.wire = self.ch.wire_out
        self._tick(force=True)
        return self.p, done, manifest

    async def _send_all(self, items: list[_Item], have: dict[int, bytes],
                        manifest: Manifest) -> None:
        """Send every item, then resend what the receiver asks for until none is
        left unacknowledged."""
        await self._pump(items, have, manifest)
        while self._inflight or self._resend:
            if self._resend:
                await self._pump([], have, manifest)
                continue
            await self._wait_changed()

    async def _await_done(self, acks: asyncio.Task[None]) -> dict[str, Any]:
        assert self._done is not None
        waiters: list[asyncio.Future[Any]] = [self._done, acks]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if self._done.done():
            return self._done.result()
        acks.result()  # raises what ended the ack reader
        raise TransferError("the receiver closed the stream before confirming the copy")

    async def _wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _drop_held_zeros(self, items: list[_Item], have: dict[int, bytes],
                         manifest: Manifest) -> list[_Item]:
        """Zero runs, minus the chunks the receiver already holds as zeros."""
        out: list[_Item] = []
        for it in items:
            if not it.zero:
                out.append(it)
                continue
            run_start = -1
            for i in range(it.index, it.index + it.count + 1):
                held = i < it.index + it.count and have.get(i) == zero_id(self.g.chunk_len(i))
                needed = i < it.index + it.count and not held
                if i < it.index + it.count:
                    manifest.ids[i] = zero_id(self.g.chunk_len(i))
                if held:
                    self.p.skipped += self.g.chunk_len(i)
                    self.p.done += self.g.chunk_len(i)
                if needed and run_start < 0:
                    run_start = i
                elif not needed and run_start >= 0:
                    out.append(_Item(run_start, i - run_start, zero=True))
                    run_start = -1
        return out

    def _item_bytes(self, it: _Item) -> int:
        return sum(self.g.chunk_len(i) for i in range(it.index, it.index + it.count))

    async def _pump(self, items: list[_Item], have: dict[int, bytes], manifest: Manifest
                    ) -> None:
        queue: deque[_Item] = deque(items)
        pending: deque[asyncio.Task[_Ready | None]] = deque()
        try:
            while queue or pending or self._resend:
                while len(pending) < self.depth and (self._resend or queue):
                    it = self._resend.popleft() if self._resend else queue.popleft()
                    pending.append(asyncio.create_task(self._prepare(it, have, manifest)))
                t0 = time.monotonic()
                ready = await pending.popleft()
                self._waits[0] += time.monotonic() - t0
                if ready is None:
                    self._tick()
                    continue
                await self._send(ready)
                if self.p.done and int(self.p.done / self.g.chunk_size) % 32 == 0:
                    cpu, link = self._waits
                    self.comp.adapt(cpu_bound=cpu > link)
                    self._waits = [0.0, 0.0]
        finally:
            for t in pending:
                t.cancel()

    async def _prepare(self, it: _Item, have: dict[int, bytes], manifest: Manifest
                       ) -> _Ready | None:
        """Read and encode one item; None when nothing needs sending."""
        g = self.g
        if it.zero:
            return self._zero_ready(it)
        length = g.chunk_len(it.index)
        data = await self.source.read(it.index * g.chunk_size, length)
        pieces = it.pieces

        def encode() -> tuple[bytes, bytes | None, bool]:
            cid = chunk_id(data)
            if cid == zero_id(length):
                return cid, None, True
            body = data if not pieces else b"".join(
                data[p.offset:p.offset + p.length] for p in pieces)
            return cid, self.comp.compress(body), False

        cid, packed, is_zero = await asyncio.to_thread(encode)
        manifest.ids[it.index] = cid
        if have.get(it.index) == cid:
            self.p.skipped += length
            self.p.done += length
            return None
        if is_zero and not pieces:
            return self._zero_ready(_Item(it.index, 1, zero=True))
        if pieces and sum(p.length for p in pieces) * 2 < length:
            plist = [(p.offset, p.length, False) for p in pieces]
            image_bytes = sum(p.length for p in pieces)
            raw = b"".join(data[p.offset:p.offset + p.length] for p in pieces)
        else:
            plist = [(0, length, False)]
            image_bytes = length
            raw = data
            if pieces:  # whole chunk after all: the compressed pieces do not apply
                packed = await asyncio.to_thread(self.comp.compress, raw)
        meta = wire.encode_data_meta(it.index, length, cid, plist)
        payload = packed if packed is not None else raw
        flags = wire.FLAG_COMPRESSED if packed is not None else 0
        return _Ready(_Item(it.index, pieces=it.pieces), Kind.DATA, meta, payload, flags,
                      image_bytes)

    def _zero_ready(self, it: _Item) -> _Ready:
        return _Ready(it, Kind.ZERO, wire.ZERO_META.pack(it.index, it.count), b"", 0,
                      self._item_bytes(it))

    async def _send(self, r: _Ready) -> None:
        size = len(r.payload) + len(r.meta)
        t0 = time.monotonic()
        while self._inflight and self._inflight_bytes + size > self.opts.window:
            await self._wait_changed()
        await self.bucket.take(wire.HEADER.size + size + 16)
        # sealed and written with no await in between: frames leave in seal order
        seq, data = self.ch.seal(r.kind, r.payload, meta=r.meta, flags=r.flags)
        self._inflight[seq] = (r.item, size)
        self._inflight_bytes += size
        await self.ch.send_raw(data)
        self._waits[1] += time.monotonic() - t0
        if r.item.index in self._retries:
            self.p.resent += r.image_bytes
        if r.kind == Kind.ZERO:
            self.p.zero += r.image_bytes
        else:
            self.p.sent += r.image_bytes
        self.p.done += self._item_bytes(r.item) if r.kind == Kind.ZERO else \
            self.g.chunk_len(r.item.index)
        self._tick()

    def _raise_if_error(self, frame: Frame) -> None:
        if frame.kind != Kind.ERROR:
            return
        try:
            msg = self.ch.open_json(frame)
        except TransferIntegrityError:
            msg = {}
        text = str(msg.get("error", "the receiver gave up"))
        cls = TransferIntegrityError if msg.get("integrity") else TransferError
        raise cls(f"receiver: {text}")

    async def _read_acks(self) -> None:
        while True:
            frame = await self.ch.read_frame()
            self._raise_if_error(frame)
            if frame.kind == Kind.DONE:
                if self._done is None:
                    raise TransferIntegrityError("DONE before END")
                self._done.set_result(self.ch.open_json(frame))
                return
            if frame.kind != Kind.ACK:
                raise TransferIntegrityError(f"unexpected {frame.kind.name} from the receiver")
            ack = self.ch.open_json(frame)
            upto = ack.get("upto")
            if not isinstance(upto, int) or isinstance(upto, bool):
                raise TransferIntegrityError("ACK frame without a frame number")
            again = _seqs(ack.get("nack", []), "nack")
            whole = _seqs(ack.get("whole", []), "whole")
            for seq in [s for s in self._inflight if s <= upto]:
                item, size = self._inflight.pop(seq)
                self._inflight_bytes -= size
                if seq in again or seq in whole:
                    n = self._retries.get(item.index, 0) + 1
                    self._retries[item.index] = n
                    if n > MAX_RETRIES:
                        raise TransferIntegrityError(
                            f"altered stream: chunk {item.index} failed to authenticate "
                            f"{n} times"
                        )
                    log.warning("chunk %d: receiver asks for it again (%d)", item.index, n)
                    self.p.done -= self._item_bytes(item) if item.zero else \
                        self.g.chunk_len(item.index)
                    self._resend.append(_Item(item.index, item.count, item.zero) if
                                        seq in whole else item)
            self._changed.set()


async def send(source: Source, reader: wire.ByteReader, writer: wire.ByteWriter, key: bytes,
               opts: SendOptions, *, manifest: Manifest | None = None,
               dirty: list[Range] | None = None, progress: ProgressFn | None = None,
               stall_s: float = wire.STALL_S) -> tuple[Progress, dict[str, Any], Manifest]:
    """Send ``source`` (or its ``dirty`` ranges) to a :func:`receive` at the other end.

    Every read and write of the stream has a deadline of ``stall_s`` s without
    progress (:class:`TransferStalledError`)."""
    return await Sender(source, reader, writer, key, opts, progress=progress,
                        stall_s=stall_s).run(manifest, dirty)


# --- receiver ------------------------------------------------------------------


@dataclass
class ReceiveResult:
    target: Path
    final: bool
    resumed: bool
    verified: str | None
    progress: Progress


@dataclass
class Hello:
    """A sender's HELLO, checked: what comes and how."""

    size: int
    chunk_size: int
    format: str
    final: bool
    verify: Verify
    delta: bool


async def handshake(reader: wire.ByteReader, writer: wire.ByteWriter, key: bytes, *,
                    stall_s: float = wire.STALL_S) -> tuple[Channel, Hello]:
    """The receiver's side of a session's start: read the preamble, answer it with our
    salt, and read the sender's HELLO, which must authenticate under the session's
    sub-key (proof that the sender holds the transfer key).

    Touches no file. Raises :class:`TransferIntegrityError` for a stream that is not
    ours or a HELLO that does not authenticate (wrong key, replayed, altered),
    :class:`TransferError` for a version or cipher we do not speak or a stream that
    ended, :class:`TransferStalledError` past the deadline."""
    version, cipher, salt = await wire.read_preamble(reader, stall_s)
    if version != wire.VERSION:
        await _answer(writer, wire.reply(1), stall_s)
        raise TransferError(f"the sender speaks stream version {version}; this "
                            f"receiver knows {wire.VERSION}")
    if cipher is None or cipher not in available_ciphers():
        await _answer(writer, wire.reply(2), stall_s)
        raise TransferError(f"the sender chose a cipher this machine lacks ({cipher})")
    ours = os.urandom(wire.SALT_BYTES)
    await _answer(writer, wire.reply(0, ours), stall_s)
    ch = Channel(reader, writer, FrameCipher(cipher, key, salt + ours), me=wire.RECEIVER,
                 stall_s=stall_s)
    hello_frame = await ch.read_frame()
    if hello_frame.kind != Kind.HELLO:
        raise TransferIntegrityError(f"expected HELLO, got {hello_frame.kind.name}")
    try:
        body = ch.open(hello_frame)
    except AuthError as exc:
        raise TransferIntegrityError(
            "wrong key or altered stream: the sender's first frame does not "
            "authenticate; nothing was written"
        ) from exc
    try:
        hello = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise TransferIntegrityError("HELLO frame is not JSON") from exc
    return ch, _check_hello(hello)


async def _answer(writer: wire.ByteWriter, data: bytes, stall_s: float) -> None:
    try:
        writer.write(data)
    except (ConnectionError, OSError, RuntimeError) as exc:
        raise TransferError("the sender closed the transfer stream") from exc
    await wire.drain(writer, stall_s)


async def receive(reader: wire.ByteReader, writer: wire.ByteWriter, key: bytes,
                  dest: Destination, *, overwrite: bool = False, sock_dir: Path,
                  progress: ProgressFn | None = None, stall_s: float = wire.STALL_S
                  ) -> ReceiveResult:
    """Receive one image (or one round) into ``dest``: :func:`handshake`, then
    :func:`receive_session`."""
    ch, hello = await handshake(reader, writer, key, stall_s=stall_s)
    return await receive_session(ch, hello, dest, overwrite=overwrite, sock_dir=sock_dir,
                                 progress=progress)


async def receive_session(ch: Channel, hello: Hello, dest: Destination, *,
                          overwrite: bool = False, sock_dir: Path,
                          progress: ProgressFn | None = None) -> ReceiveResult:
    """Receive the image an authenticated sender (:func:`handshake`) announced.

    Until the last round has been verified, the data lives in
    ``<target>.vmxfer-partial`` with its journal ``<target>.vmxfer-journal``;
    both stay after any failure so the next run resumes. ``overwrite`` (the
    receiver's own invocation decides it, never the sender) lets the final
    rename replace an existing regular file. Raises :class:`ConflictError` when the
    target exists (without ``overwrite``) or a partial copy or journal is not a
    regular file of ours (nothing written), :class:`TransferIntegrityError` for a
    copy that does not verify, :class:`TransferStalledError` when the stream stalls
    (what arrived before is written and committed first)."""
    rx = _Receiver(ch, dest, overwrite, sock_dir, progress)
    keepalive = asyncio.create_task(ch.keepalive())
    try:
        return await rx.run(hello)
    except TransferError as exc:
        if not ch.stalled:
            await rx.try_error(str(exc), isinstance(exc, TransferIntegrityError))
        raise
    except (UserError, StateError) as exc:
        await rx.try_error(str(exc), False)
        raise
    finally:
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive


def _check_hello(hello: Any) -> Hello:
    if not isinstance(hello, dict):
        raise TransferIntegrityError("HELLO frame is not a JSON object")
    try:
        size, chunk, fmt = hello["size"], hello["chunk_size"], hello["format"]
        final, verify, delta = hello["final"], hello["verify"], hello["delta"]
    except KeyError as exc:
        raise TransferIntegrityError(f"HELLO frame is incomplete: {exc}") from exc
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, chunk)) \
            or not all(isinstance(v, bool) for v in (final, delta)) \
            or not isinstance(fmt, str) or not isinstance(verify, str):
        raise TransferIntegrityError("HELLO frame has fields of the wrong type")
    if size <= 0 or size > 1 << 56 or chunk < 4096 or chunk > 16 << 20 \
            or chunk & (chunk - 1):
        raise TransferIntegrityError(f"HELLO frame has a bad geometry: {size}/{chunk}")
    if fmt not in FORMATS or verify not in ("full", "journal"):
        raise UserError(f"unknown target format {fmt!r} or verification {verify!r}")
    return Hello(size, chunk, fmt, final, verify, delta)  # type: ignore[arg-type]


class _Receiver:
    def __init__(self, ch: Channel, dest: Destination, overwrite: bool, sock_dir: Path,
                 progress: ProgressFn | None) -> None:
        self.ch = ch
        self.dest = dest
        self.target = Path(str(dest.target))
        self.overwrite = overwrite
        self.sock_dir = sock_dir
        self.progress_fn = guarded(progress) if progress is not None else None
        self._last = 0.0

    async def try_error(self, message: str, integrity: bool) -> None:
        with contextlib.suppress(TransferError, OSError, TimeoutError, ConnectionError):
            await asyncio.wait_for(
                self.ch.send_json(Kind.ERROR, {"error": message, "integrity": integrity}), 5)

    async def run(self, hello: Hello) -> ReceiveResult:
        size, fmt, final = hello.size, hello.format, hello.final
        self.dest.check(overwrite=self.overwrite)
        g = Geometry(size, hello.chunk_size, fmt)
        zeros = {g.chunk_len(0): zero_id(g.chunk_len(0)),
                 g.chunk_len(g.chunks() - 1): zero_id(g.chunk_len(g.chunks() - 1))}
        journal, resumed = Journal.open(self.dest.journal, g, zeros, dest=self.dest)
        try:
            if not resumed:
                if hello.delta:
                    raise TransferError(f"no base copy of {self.target} to apply a round to")
                # without a journal it proves nothing (checked above: a file of ours)
                self.dest.unlink(self.dest.partial_name)
            async with open_target(self.dest, fmt, size, sock_dir=self.sock_dir) as tgt:
                if journal.unsynced:
                    await self._recheck(tgt, journal)
                await self.ch.send(Kind.STATE, _pack_ids(journal.state()))
                p = Progress(size)
                try:
                    ids = await self._frames(tgt, journal, g, p)
                except BaseException:
                    # keep what arrived: make it durable so a resume trusts it unread
                    with contextlib.suppress(Exception):
                        await asyncio.shield(tgt.sync())
                        journal.sync()
                    raise
                await tgt.sync()
                journal.sync()
                verified: str | None = None
                if final:
                    await self._verify(tgt, journal, g, ids, hello.verify)
                    verified = hello.verify
            if final:
                self.dest.commit(overwrite=self.overwrite)
                journal.remove()
            p.wire = self.ch.wire_in
            await self.ch.send_json(Kind.DONE, {"ok": True, "final": final,
                                                "verified": verified, **p.as_dict()})
            return ReceiveResult(self.target, final, resumed, verified, p)
        finally:
            journal.close()

    async def _recheck(self, tgt: Target, journal: Journal) -> None:
        """Trust records written after the last sync only if the target agrees."""
        bad = set()
        g = journal.geometry
        for i in sorted(journal.unsynced):
            data = await tgt.read(i * g.chunk_size, g.chunk_len(i))
            if chunk_id(data) != journal.chunks.get(i):
                bad.add(i)
        if bad:
            log.info("%d chunks written after the last commit did not survive", len(bad))
            journal.forget(bad)
        journal.sync()

    async def _frames(self, tgt: Target, journal: Journal, g: Geometry, p: Progress
                      ) -> list[bytes]:
        """Apply frames until END; return the sender's chunk ids."""
        # the stream is read ahead while chunks are written and committed, so the
        # sender's bytes keep flowing (up to READ_AHEAD frames)
        queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue(READ_AHEAD)

        async def read_ahead() -> None:
            while True:
                try:
                    f = await self.ch.read_frame()
                except BaseException as exc:
                    await queue.put(exc)
                    return
                await queue.put(f)
                if f.kind in (Kind.END, Kind.ERROR):
                    return

        reader = asyncio.create_task(read_ahead())
        try:
            return await self._apply(queue, tgt, journal, g, p)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _apply(self, queue: asyncio.Queue[Frame | BaseException], tgt: Target,
                     journal: Journal, g: Geometry, p: Progress) -> list[bytes]:
        last_commit = time.monotonic()
        pending_ack: dict[str, Any] = {}
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            frame = item
            if frame.kind == Kind.ERROR:
                msg = self.ch.open_json(frame)
                raise TransferError(f"sender: {msg.get('error', 'gave up')}")
            if frame.kind == Kind.END:
                try:
                    body = self.ch.open(frame)
                except AuthError as exc:
                    raise TransferIntegrityError("altered stream: END does not authenticate"
                                                 ) from exc
                return self._end_ids(body, g)
            if frame.kind not in (Kind.DATA, Kind.ZERO, Kind.PING):
                raise TransferIntegrityError(f"unexpected {frame.kind.name} frame")
            ack = pending_ack
            ack["upto"] = frame.seq
            try:
                if frame.kind == Kind.PING:  # only a PING that did not authenticate comes
                    raise AuthError("a PING frame does not authenticate")
                payload = await asyncio.to_thread(self.ch.open, frame)
            except AuthError:
                log.warning("frame %d does not authenticate; asking for it again", frame.seq)
                ack.setdefault("nack", []).append(frame.seq)
                await self.ch.send_json(Kind.ACK, ack)
                pending_ack = {}
                continue
            if frame.kind == Kind.ZERO:
                first, count = wire.decode_zero_meta(frame.meta)
                if first + count > g.chunks() or count < 1:
                    raise TransferIntegrityError("zero run outside the image")
                end = min(g.size, (first + count) * g.chunk_size)
                await tgt.zero(first * g.chunk_size, end - first * g.chunk_size)
                journal.record_zeros(first, count)
                p.zero += end - first * g.chunk_size
            else:
                if not await self._data(tgt, journal, g, frame, payload, p):
                    ack.setdefault("whole", []).append(frame.seq)
            if queue.empty() or len(ack) > 1 or frame.seq % 8 == 0:
                # acknowledge in batches while frames wait, at once when none does
                await self.ch.send_json(Kind.ACK, ack)
                pending_ack = {}
            now = time.monotonic()
            if now - last_commit >= COMMIT_S:
                await tgt.sync()
                journal.sync()
                last_commit = now
            if self.progress_fn and now - self._last >= 0.25:
                self._last = now
                p.wire = self.ch.wire_in
                self.progress_fn(p.event())

    async def _data(self, tgt: Target, journal: Journal, g: Geometry, frame: Frame,
                    payload: bytes, p: Progress) -> bool:
        """Apply one DATA frame; False when the chunk must come again whole."""
        index, length, cid, pieces = wire.decode_data_meta(frame.meta)
        if index >= g.chunks() or length != g.chunk_len(index):
            raise TransferIntegrityError(f"chunk {index} is outside the image")
        whole = len(pieces) == 1 and pieces[0][:2] == (0, length)
        compressed = bool(frame.flags & wire.FLAG_COMPRESSED)

        def unpack(data: bytes) -> tuple[bytes, bool]:
            """Decompress, and for a whole chunk check its id (one thread hop)."""
            if compressed:
                try:
                    data = zstandard.ZstdDecompressor().decompress(
                        data, max_output_size=length)
                except zstandard.ZstdError as exc:
                    raise TransferIntegrityError(
                        f"chunk {index} does not decompress") from exc
            return data, (not whole) or (len(data) == length and chunk_id(data) == cid)

        payload, ok = await asyncio.to_thread(unpack, payload)
        if len(payload) != sum(ln for _o, ln, zero in pieces if not zero):
            raise TransferIntegrityError(f"chunk {index}: pieces and payload disagree")
        base = index * g.chunk_size
        if whole:
            if not ok:
                raise TransferIntegrityError(f"chunk {index} does not match its id")
            await tgt.write(base, payload)
        else:
            pos = 0
            for off, ln, zero in pieces:
                if zero:
                    await tgt.zero(base + off, ln)
                    continue
                await tgt.write(base + off, payload[pos:pos + ln])
                pos += ln
            if pos != len(payload):
                raise TransferIntegrityError(f"chunk {index}: pieces and payload disagree")
            now = await tgt.read(base, length)
            if await asyncio.to_thread(chunk_id, now) != cid:
                # our copy of the rest of the chunk is not the sender's: take it whole
                journal.forget({index})
                return False
        journal.record(index, cid)
        p.sent += sum(ln for _o, ln, _z in pieces)
        return True

    @staticmethod
    def _end_ids(body: bytes, g: Geometry) -> list[bytes]:
        head = struct.Struct(">B32s")
        n = g.chunks()
        if len(body) != head.size + 32 * n:
            raise TransferIntegrityError("END frame has the wrong number of chunk ids")
        _final, digest = head.unpack_from(body)
        ids = [body[head.size + 32 * i: head.size + 32 * (i + 1)] for i in range(n)]
        if image_digest(ids) != digest:
            raise TransferIntegrityError("END frame's digest does not match its chunk ids")
        return ids

    async def _verify(self, tgt: Target, journal: Journal, g: Geometry, ids: list[bytes],
                      verify: Verify) -> None:
        missing = [i for i in range(g.chunks()) if journal.chunks.get(i) != ids[i]]
        if missing:
            journal.forget(set(missing))
            journal.sync()
            raise TransferError(
                f"{len(missing)} chunks never arrived or differ from the source "
                f"(first: {missing[0]}); rerun the transfer to send them"
            )
        if verify != "full":
            return
        bad: set[int] = set()
        for it in _plan_full(await tgt.allocation(), g):
            for i in range(it.index, it.index + it.count):
                off, ln = i * g.chunk_size, g.chunk_len(i)
                if it.zero:
                    got = zero_id(ln)
                else:
                    got = await asyncio.to_thread(chunk_id, await tgt.read(off, ln))
                if got != ids[i]:
                    bad.add(i)
        if bad:
            journal.forget(bad)
            journal.sync()
            raise TransferIntegrityError(
                f"the copy differs from the source in {len(bad)} chunks after writing "
                f"(first: {min(bad)}); they will be resent by the next run"
            )
