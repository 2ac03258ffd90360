"""Where the engine reads and writes image bytes, on the machine it runs on.

Sources: a raw file (allocation map from ``SEEK_DATA``/``SEEK_HOLE``), or any
image behind NBD: a qcow2 exported by a ``qemu-nbd`` we start, or a running
VM's disk exported by its own QEMU, whose dirty bitmap then tells an
incremental round what changed (``qemu:dirty-bitmap:NAME``).

Targets: a raw file written in place (zero ranges punched out, so it stays
thin), or a qcow2 written through a ``qemu-nbd`` we start.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmigrate.errors import SpecError, TransferError
from vmigrate.transfer.confine import Destination
from vmigrate.transfer.nbd import NBD_STATE_DIRTY, NBD_STATE_ZERO, NbdClient, serve_image

FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class Range:
    """``length`` bytes at ``offset``; ``zero`` when they are known to read as zeros."""

    offset: int
    length: int
    zero: bool = False


class Source(Protocol):
    size: int

    async def allocation(self) -> list[Range]:
        """Ranges covering the whole image in order, zero ones marked."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...


class Target(Protocol):
    size: int

    async def write(self, offset: int, data: bytes) -> None: ...
    async def zero(self, offset: int, length: int) -> None: ...
    async def read(self, offset: int, length: int) -> bytes: ...
    async def allocation(self) -> list[Range]: ...
    async def sync(self) -> None: ...


class RawFile:
    """A raw image file, as a source (read only) or a target."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size

    async def allocation(self) -> list[Range]:
        return await asyncio.to_thread(_seek_map, self.fd, self.size)

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(_pread_full, self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.to_thread(_pwrite_full, self.fd, data, offset)

    async def zero(self, offset: int, length: int) -> None:
        await asyncio.to_thread(_punch, self.fd, offset, length)

    async def sync(self) -> None:
        await asyncio.to_thread(os.fdatasync, self.fd)


class NbdImage:
    """An image behind an NBD export."""

    def __init__(self, client: NbdClient, bitmap: str | None = None) -> None:
        self.client = client
        self.size = client.size
        self.bitmap = bitmap

    async def allocation(self) -> list[Range]:
        return [Range(e.offset, e.length, bool(e.flags & NBD_STATE_ZERO))
                async for e in self.client.extents("base:allocation")]

    async def dirty(self) -> list[Range]:
        """The ranges the export's bitmap marks dirty (merged, in order)."""
        if self.bitmap is None:
            raise TransferError("this export carries no dirty bitmap")
        out: list[Range] = []
        async for e in self.client.extents(f"qemu:dirty-bitmap:{self.bitmap}"):
            if not e.flags & NBD_STATE_DIRTY:
                continue
            if out and out[-1].offset + out[-1].length == e.offset:
                out[-1] = Range(out[-1].offset, out[-1].length + e.length)
            else:
                out.append(Range(e.offset, e.length))
        return out

    async def read(self, offset: int, length: int) -> bytes:
        return await self.client.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.client.write(offset, data)

    async def zero(self, offset: int, length: int) -> None:
        await self.client.write_zeroes(offset, length, may_trim=True)

    async def sync(self) -> None:
        await self.client.flush()


def _source_size(path: Path, st: os.stat_result) -> int:
    """The size of a source image; :class:`SpecError` (a wrong request, exit status 2)
    for anything but a non-empty regular file (``/dev/null``, a FIFO, a directory)."""
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{path}: not a regular file; a source image is a raw or qcow2 file")
    if st.st_size == 0:
        raise SpecError(f"{path}: the image is empty; nothing to copy")
    return st.st_size


def probe_format(path: Path) -> str:
    """``raw`` or ``qcow2``, from the file's first bytes (like ``qemu-img`` would).
    :class:`SpecError` for a missing, unreadable, empty or special file."""
    try:
        _source_size(path, os.stat(path))
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such image") from exc
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such image") from exc
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    return "qcow2" if head == b"QFI\xfb" else "raw"


@asynccontextmanager
async def open_source(path: Path, fmt: str | None = None, *, sock_dir: Path,
                      force_share: bool = False) -> AsyncIterator[RawFile | NbdImage]:
    """Open a local image for reading. qcow2 goes through a read-only ``qemu-nbd``
    on a socket in ``sock_dir``, stopped on exit; ``force_share`` opens it even
    while a running QEMU holds it (reads then may not be a consistent snapshot)."""
    fmt = fmt or probe_format(path)
    if fmt not in FORMATS:
        raise SpecError(f"unknown image format {fmt!r} (use raw or qcow2)")
    if fmt == "raw":
        try:
            # O_NONBLOCK: a FIFO given as the source must not hang the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise SpecError(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            size = _source_size(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        try:
            yield RawFile(path, fd, size)
        finally:
            os.close(fd)
        return
    if not await asyncio.to_thread(os.path.exists, path):
        raise SpecError(f"{path}: no such image")
    async with (
        serve_image(path, "qcow2", sock_dir / f"src-{os.getpid()}.sock",
                    read_only=True, force_share=force_share) as addr,
        await NbdClient.connect(addr) as client,
    ):
        yield NbdImage(client)


@asynccontextmanager
async def open_nbd(address: str, export: str, bitmap: str | None = None
                   ) -> AsyncIterator[NbdImage]:
    """An export of a running VM's disk (its QEMU's NBD server)."""
    contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{bitmap}"] if bitmap else [])
    async with await NbdClient.connect(address, export, meta_contexts=contexts) as client:
        yield NbdImage(client, bitmap)


@asynccontextmanager
async def open_target(dest: Destination, fmt: str, size: int, *, sock_dir: Path
                      ) -> AsyncIterator[RawFile | NbdImage]:
    """Open (creating if needed) ``dest``'s partial copy of ``size`` bytes for writing.

    The file is opened with ``O_NOFOLLOW`` relative to the destination's directory
    and must be a regular file with one link (:class:`~vmigrate.errors.ConflictError`
    otherwise, left untouched); a qcow2 one is then handed to ``qemu-img`` and
    ``qemu-nbd`` as ``/proc/<pid>/fd/<fd>``, the open file itself, never by name."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown image format {fmt!r} (use raw or qcow2)")
    fd = dest.open_file(dest.partial_name, create=True)
    try:
        if fmt == "raw":
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
            except OSError as exc:
                raise TransferError(f"cannot create {dest.partial}: {exc.strerror}") from exc
            yield RawFile(dest.partial, fd, size)
            return
        path = dest.proc_path(fd)
        if os.fstat(fd).st_size == 0:
            res = await asyncio.to_thread(
                subprocess.run,
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                 path, str(size)],
                capture_output=True, text=True,
            )
            if res.returncode != 0:
                raise TransferError(f"cannot create {dest.partial}: {res.stderr.strip()}")
        async with AsyncExitStack() as stack:
            addr = await stack.enter_async_context(
                serve_image(path, "qcow2", sock_dir / f"dst-{os.getpid()}.sock",
                            read_only=False)
            )
            client = await stack.enter_async_context(await NbdClient.connect(addr))
            if client.size != size:
                raise TransferError(f"{dest.partial} holds {client.size} bytes, expected "
                                    f"{size}")
            yield NbdImage(client)
    finally:
        os.close(fd)


# --- raw file helpers ------------------------------------------------------

SEEK_DATA, SEEK_HOLE = 3, 4


def _seek_map(fd: int, size: int) -> list[Range]:
    out: list[Range] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                out.append(Range(pos, size - pos, True))
                break
            return [Range(0, size)]  # no SEEK_DATA here: everything may be data
        if data > pos:
            out.append(Range(pos, data - pos, True))
        hole = min(os.lseek(fd, data, SEEK_HOLE), size)
        out.append(Range(data, hole - data))
        pos = hole
    return out


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    buf = os.pread(fd, length, offset)
    while len(buf) < length:
        more = os.pread(fd, length - len(buf), offset + len(buf))
        if not more:
            return buf + bytes(length - len(buf))  # past EOF reads as zeros
        buf += more
    return buf


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


def _punch(fd: int, offset: int, length: int) -> None:
    """Make the range read as zeros and, where the file system can, a hole."""
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                         ctypes.c_long(offset), ctypes.c_long(length))
    if rc == 0:
        return
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        _pwrite_full(fd, zeros[:n], offset)
        offset += n
