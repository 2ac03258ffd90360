"""The fake mover: disk copies between fake hosts, with the real receiver's rules.

A copy writes ``TARGET`` + :data:`~vmigrate.transfer.mover.PARTIAL_SUFFIX` first
and renames it to ``TARGET`` only when ``opts.final``; an existing target
without ``opts.overwrite`` is refused (:class:`~vmigrate.errors.ConflictError`);
a delta (a bitmap's blocks) needs the partial copy of an earlier round. After a
failure (:class:`~vmigrate.errors.TransferError`) the partial copy keeps what was
written, and the same copy run again resumes: blocks the partial already holds
are skipped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmigrate.errors import (
    ConflictError,
    DestinationFullError,
    HostUnreachableError,
    TransferError,
    UserError,
)
from vmigrate.progress import Event, ProgressFn, guarded
from vmigrate.testing.fakehv._faults import ControllerCrash, Fault
from vmigrate.testing.fakehv._model import FakeExport, FakeHost, FakeImage, FakeVm
from vmigrate.transfer.mover import (
    PARTIAL_SUFFIX,
    CopyResult,
    ExportEnd,
    ImageEnd,
    Mover,
    SendOptions,
)

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._cluster import FakeCluster

__all__ = ["CopyRecord", "FakeMover"]

#: bytes of framing per block sent (what the wire count adds to the data)
_FRAME = 48
#: blocks between two progress events
_EVERY = 16


@dataclass(frozen=True)
class CopyRecord:
    """One copy the mover did (or began: ``result`` None when it failed)."""

    src: ImageEnd | ExportEnd
    dst: ImageEnd
    opts: SendOptions
    manifest: str | None
    result: CopyResult | None


class FakeMover(Mover):
    """Copies between the fake hosts of a cluster (see the module doc)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        #: every copy, in order
        self.copies: list[CopyRecord] = []
        self._rounds: dict[tuple[str, str], int] = {}

    def _fault_error(self, fault: Fault, where: str) -> BaseException:
        if fault.kind == "crash":
            self.cluster.restart_controller()
            return ControllerCrash(f"controller crashed during the copy {where}")
        if fault.kind == "unreachable":
            return HostUnreachableError(f"copy {where}: a host does not answer (injected)")
        if fault.kind == "full":
            return DestinationFullError(f"copy {where}: No space left on device (injected "
                                        "ENOSPC); the partial copy is kept")
        return TransferError(f"copy {where} failed (injected {fault.kind})")

    def _export(self, src: ExportEnd, host: FakeHost) -> tuple[FakeVm, FakeExport]:
        address = src.address
        server: FakeVm | None = None
        if address.startswith("unix:"):
            use = host.sockets.get(address[5:])
            where = host
        elif address.startswith("tcp:"):
            name, sep, port = address[4:].rpartition(":")
            if not sep or not port.isdigit():
                raise UserError(f"NBD address {address!r} is not tcp:HOST:PORT")
            found = self.cluster._host_by_address(name.strip("[]"), host.name)
            where = found if found is not None else host
            use = found.ports.get(int(port)) if found is not None else None
            if found is not None and not self.cluster.link_is_up(host.name, found.name):
                raise TransferError(f"cannot connect to {address}: the link is down")
        else:
            raise UserError(f"NBD address {address!r} is neither unix:PATH nor tcp:HOST:PORT")
        if use is not None and use.kind == "nbd":
            server = next((p for p in where.processes() if p.pid == use.pid), None)
        if server is None or server.nbd is None:
            raise TransferError(f"cannot connect to {address} on {host.name}: "
                                f"Connection refused")
        if server.nbd.tls_id is not None:
            raise TransferError(f"the NBD server at {address} requires TLS")
        export = server.nbd.by_name(src.export)
        if export is None:
            raise TransferError(f"the NBD server at {address} has no export {src.export!r}")
        return server, export

    def _source(self, src: ImageEnd | ExportEnd, host: FakeHost
                ) -> tuple[FakeImage, set[int] | None]:
        """The image to read, and the blocks a delta sends (None: all)."""
        if isinstance(src, ImageEnd):
            image = host.files.get(src.path)
            if image is None:
                raise TransferError(f"{src.path} not found on {src.host}")
            if src.format is not None and src.format != image.format:
                raise TransferError(f"{src.path} is {image.format}, not {src.format}")
            return image, None
        if src.delta and src.bitmap is None:
            raise UserError("a delta copy needs a bitmap")
        vm, export = self._export(src, host)
        node = vm.nodes[export.node]
        assert node.image is not None
        if src.bitmap is None:
            return node.image, None
        if src.bitmap not in export.bitmaps:
            raise TransferError(f"export {src.export!r} does not carry bitmap {src.bitmap!r}")
        bitmap = vm.bitmaps.get((export.node, src.bitmap))
        if bitmap is None:
            raise TransferError(f"bitmap {src.bitmap!r} is gone")
        return node.image, set(bitmap.blocks) if src.delta else None

    async def copy(self, src: ImageEnd | ExportEnd, dst: ImageEnd, opts: SendOptions, *,
                   manifest: str | None = None,
                   progress: ProgressFn | None = None) -> CopyResult:
        """See the module doc. Refused before anything is written: an existing target
        without ``overwrite`` (:class:`ConflictError`), a missing source, export or
        bitmap, a delta without a base copy, a cut link, too little room
        (:class:`TransferError`); an unreachable host
        (:class:`HostUnreachableError`)."""
        await asyncio.sleep(0)
        cluster = self.cluster
        where = f"{src.host} -> {dst.host}:{dst.path}"
        hit = cluster._enter(src.host, None, "copy", "mover", also=dst.host)
        if hit.before is not None:
            raise self._fault_error(hit.before, where)
        record_at = len(self.copies)
        self.copies.append(CopyRecord(src, dst, opts, manifest, None))
        s_host, d_host = cluster.host(src.host), cluster.host(dst.host)
        for h in (s_host, d_host):
            if not h.reachable:
                raise HostUnreachableError(f"host {h.name} does not answer")
        if not cluster.link_is_up(s_host.name, d_host.name):
            raise TransferError(f"copy {where}: {dst.host} cannot be reached from "
                                f"{src.host} (the link is down)")
        image, dirty = self._source(src, s_host)
        if opts.target_format not in ("raw", "qcow2"):
            raise UserError(f"unknown target format {opts.target_format!r}")
        if dst.path in d_host.files and not opts.overwrite:
            raise ConflictError(f"{dst.path} already exists on {dst.host}; remove it or pass "
                                f"--overwrite")
        partial_path = dst.path + PARTIAL_SUFFIX
        partial = d_host.files.get(partial_path)
        if dirty is not None:
            if partial is None:
                raise TransferError(f"no base copy of {dst.path} to apply a round to")
            if partial.size != image.size:
                raise TransferError(f"the base copy of {dst.path} has another size")
            blocks = sorted(dirty)
            skipped: list[int] = []
        else:
            blocks = list(range(image.nblocks))
            if partial is None or partial.size != image.size or \
                    partial.format != opts.target_format:
                partial = None
            skipped = [] if partial is None else [
                b for b in blocks if partial.read_block(b) == image.read_block(b)]
        todo = [b for b in blocks if b not in set(skipped)]
        need = sum(image.block_len(b) for b in todo if image.read_block(b))
        used = sum(f.allocated for f in {id(f): f for f in d_host.files.values()}.values())
        if need > d_host.capacity - used:
            raise TransferError(f"copy {where}: No space left on device")
        if partial is None:
            partial = FakeImage(partial_path, opts.target_format, image.size,
                                block_size=image.block_size)
            cluster._drop_file(dst.host, partial_path)
            cluster._put_file(dst.host, partial_path, partial)
        strike = next((f for f in hit.after if f.kind != "cancel"), None)
        if strike is not None:
            todo = todo[:len(todo) // 2]
        report = guarded(progress)
        total = sum(image.block_len(b) for b in blocks)
        done = sum(image.block_len(b) for b in skipped)
        report(Event(done=done, total=total))
        data = zero = 0
        for i, block in enumerate(todo, 1):
            content = image.read_block(block)
            partial.write_block(block, content)
            length = image.block_len(block)
            done += length
            if content:
                data += length
            else:
                zero += length
            if i % _EVERY == 0:
                report(Event(done=done, total=total))
        if strike is not None:
            raise self._fault_error(strike, where)
        for fault in hit.after:
            if fault.on_cancel is not None:
                fault.on_cancel()
        if opts.final:
            cluster._drop_file(dst.host, partial_path)
            partial.path = dst.path
            cluster._drop_file(dst.host, dst.path)
            cluster._put_file(dst.host, dst.path, partial)
        if manifest is not None:
            key = (src.host, manifest)
            self._rounds[key] = self._rounds.get(key, 0) + 1
            cluster._drop_file(src.host, manifest)
            cluster.add_file(src.host, manifest, f"rounds={self._rounds[key]}\n".encode())
        report(Event(done=total, total=total))
        wire = data + _FRAME * len(todo) + 64
        rate = cluster.link_rate(s_host.name, d_host.name)
        if opts.bandwidth:
            rate = min(rate, opts.bandwidth)
        result = CopyResult(
            data_bytes=data, wire_bytes=wire, zero_bytes=zero,
            skipped_bytes=sum(image.block_len(b) for b in skipped), resent_bytes=0,
            seconds=round(wire / rate, 6) if rate > 0 else 0.0,
            verified=opts.verify if opts.final else None, transport="fake")
        self.copies[record_at] = CopyRecord(src, dst, opts, manifest, result)
        return result
