"""The transfer seam: how the migration engine moves one disk image between hosts.

:class:`Mover` is what cold and warm migration ask of the transfer engine: copy
an image file (a stopped VM's disk) or a running VM's disk read through its
hypervisor's NBD export (optionally only what a dirty bitmap marks) into a file
on another host. :class:`EngineMover` does it with :func:`vmigrate.transfer.remote.copy`
(both ends on their hosts, bytes straight over the migration network);
:mod:`vmigrate.testing.fakehv` has an in-memory one.

What holds after a failure (:class:`~vmigrate.errors.TransferError`): the
receiver keeps what it committed in ``TARGET`` + :data:`PARTIAL_SUFFIX` and its
journal, so the same copy run again resumes; the target itself exists only
after a final copy that verified.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vmigrate.config import Inventory
from vmigrate.hosts import Host, open_host
from vmigrate.progress import ProgressFn
from vmigrate.transfer.engine import PARTIAL_SUFFIX, SendOptions
from vmigrate.transfer.remote import NbdSource, Place, copy

__all__ = ["PARTIAL_SUFFIX", "CopyResult", "EngineMover", "ExportEnd", "ImageEnd", "Mover",
           "SendOptions"]


@dataclass(frozen=True)
class ImageEnd:
    """An image file on an inventory host; ``format`` None: detect (a source) or raw."""

    host: str
    path: str
    format: str | None = None


@dataclass(frozen=True)
class ExportEnd:
    """A running VM's disk, exported by its hypervisor on ``host`` at ``address``
    (``unix:/path`` as seen on that host), export ``export``; with ``bitmap`` and
    ``delta``, only the blocks the dirty bitmap marks."""

    host: str
    address: str
    export: str
    bitmap: str | None = None
    delta: bool = False


@dataclass(frozen=True)
class CopyResult:
    """What one copy did, in image bytes unless said otherwise."""

    #: bytes sent as data (after zero skipping, before compression)
    data_bytes: int
    #: bytes on the wire (framed, compressed, encrypted)
    wire_bytes: int
    #: bytes sent as zero ranges (no data crossed)
    zero_bytes: int
    #: bytes the receiver already held (a resumed copy)
    skipped_bytes: int
    #: bytes sent again after the receiver refused a frame
    resent_bytes: int
    seconds: float
    #: "full" (every byte re-read and checked on the receiver), "journal", or None (an
    #: incremental round, checked at the final copy)
    verified: str | None
    transport: str = ""


class Mover(ABC):
    """Copies disk images between hosts (see the module doc)."""

    @abstractmethod
    async def copy(self, src: ImageEnd | ExportEnd, dst: ImageEnd, opts: SendOptions, *,
                   manifest: str | None = None,
                   progress: ProgressFn | None = None) -> CopyResult:
        """Copy ``src`` into ``dst`` (format ``opts.target_format``). ``manifest``: a
        file on the source host recording what earlier rounds sent (warm). With
        ``opts.final`` off the copy is a round: it stays under the partial name."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class EngineMover(Mover):
    """Copies with vmigrate's own transfer engine, both ends on their hosts."""

    def __init__(self, inventory: Inventory, hosts: dict[str, Host] | None = None) -> None:
        self.inventory = inventory
        self._hosts: dict[str, Host] = dict(hosts or {})
        self._opened: list[Host] = []

    def _host(self, name: str) -> Host:
        if name not in self._hosts:
            self._hosts[name] = open_host(self.inventory.host(name))
            self._opened.append(self._hosts[name])
        return self._hosts[name]

    async def copy(self, src: ImageEnd | ExportEnd, dst: ImageEnd, opts: SendOptions, *,
                   manifest: str | None = None,
                   progress: ProgressFn | None = None) -> CopyResult:
        hosts = {src.host: self._host(src.host), dst.host: self._host(dst.host)}

        source: Place | tuple[str, NbdSource]
        if isinstance(src, ExportEnd):
            source = (src.host, NbdSource(src.address, src.export, bitmap=src.bitmap,
                                          delta=src.delta))
            fmt = None
        else:
            source, fmt = Place(src.host, src.path), src.format
        out = await copy(self.inventory, source, Place(dst.host, dst.path), opts,
                         source_format=fmt, manifest=manifest, progress=progress, hosts=hosts)
        d = out.as_dict()

        def n(key: str) -> int:
            value = d.get(key)
            return int(value) if isinstance(value, int | float) else 0

        verified = d.get("verified")
        return CopyResult(
            data_bytes=n("data_bytes"), wire_bytes=n("wire_bytes"), zero_bytes=n("zero_bytes"),
            skipped_bytes=n("skipped_bytes"), resent_bytes=n("resent_bytes"),
            seconds=float(d.get("seconds") or 0.0),
            verified=str(verified) if verified else None, transport=str(d.get("transport")))

    async def close(self) -> None:
        for host in self._opened:
            with contextlib.suppress(Exception):
                await host.close()
        self._opened.clear()
