"""``vmigrate copy-disk`` (rsync for VM images) and the ``vmigrate transfer`` ends
that the controller starts on hosts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.cli.transfer_ends import (
    BandwidthOpt,
    ChunkOpt,
    CipherOpt,
    CompressOpt,
    VerifyOpt,
    _options,
)
from vmigrate.errors import UserError
from vmigrate.progress import Event
from vmigrate.transfer.engine import CHUNK_SIZE
from vmigrate.transfer.remote import Outcome, Place, copy, parse_place


def _mib(n: Any) -> str:
    return f"{(n or 0) / 1048576:.1f} MiB"


class _Bar:
    """A progress bar on a terminal; a line every 5 s otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.tty = enabled and err.is_terminal
        self.enabled = enabled
        self.label = label
        self.bar: Progress | None = None
        self._last = 0.0

    def __enter__(self) -> _Bar:
        if self.tty:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=err, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def __call__(self, ev: Event) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=ev.total, completed=ev.done or 0)
        elif self.enabled and time.monotonic() - self._last >= 5:
            self._last = time.monotonic()
            total = ev.total or 0
            pct = 100 * (ev.done or 0) / total if total else 0
            err.print(f"{self.label}: {pct:5.1f}% of {_mib(total)}, "
                      f"{_mib(ev.figures.get('wire_bytes'))} on the wire")


def render(o: Outcome) -> None:
    d = o.as_dict()
    secs = d["seconds"] or 1e-9
    out.print(f"copied {_mib(d['image_bytes'])} in {secs:.1f} s over {d['transport']}: "
              f"{_mib(d['data_bytes'])} data, {_mib(d['zero_bytes'])} zeros skipped, "
              f"{_mib(d['skipped_bytes'])} already there, {_mib(d['resent_bytes'])} resent; "
              f"{_mib(d['wire_bytes'])} on the wire "
              f"({(d['wire_bytes'] or 0) * 8 / secs / 1e6:.0f} Mbit/s); "
              f"verified: {d['verified']}")


def copy_disk(
    src: Annotated[str, typer.Argument(help="Source image: PATH on this machine or HOST:PATH.")],
    dst: Annotated[str, typer.Argument(
        help="Destination: HOST:PATH (an inventory host) or a PATH here.")],
    target_format: Annotated[str | None, typer.Option(
        "--format", help="Format of the copy: raw or qcow2 (default: the source's).")] = None,
    source_format: Annotated[str | None, typer.Option(
        help="Format of the source (default: probed).")] = None,
    bandwidth: BandwidthOpt = None,
    transport: Annotated[str, typer.Option(
        help="tcp: straight between hosts on the migration network; ssh: through this "
        "machine over SSH; auto: tcp between two hosts, else ssh.")] = "auto",
    cipher: CipherOpt = "aes-256-gcm",
    compress: CompressOpt = "auto",
    verify: VerifyOpt = "full",
    chunk_size: ChunkOpt = CHUNK_SIZE,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Copy a VM disk image to a host: zeros skipped, compressed, encrypted, verified.

    An interrupted copy (killed, link lost) resumes when rerun with the same
    arguments: the receiver keeps a journal next to DST, and only the chunks
    it lacks are sent again. DST appears only once the copy has been verified
    against the source; until then it is DST.vmxfer-partial.

    Exit status: 0 copied and verified; 1 failed (rerun to resume); 2 bad
    request; 6 the stream or the copy did not verify (wrong key, altered data);
    8 the destination is out of space (the partial copy is kept: free space and
    rerun to resume).
    """
    if transport not in ("auto", "ssh", "tcp"):
        raise UserError("--transport is auto, ssh or tcp")
    src_place, dst_place = parse_place(src), parse_place(dst)
    fmt = target_format
    if fmt is None:
        fmt = source_format or _probe_local(src_place) or "raw"
    opts = _options(fmt, chunk_size, cipher, compress, verify, bandwidth, True, overwrite,
                    16 << 20)
    inv = CTX.inventory(required=src_place.host is not None or dst_place.host is not None)
    with _Bar(f"{src_place} -> {dst_place}", enabled=True) as bar:
        outcome = run(copy(inv, src_place, dst_place, opts,
                           transport=transport,  # type: ignore[arg-type]
                           source_format=source_format, progress=bar))
    if as_json:
        print_json(outcome.as_dict())
    else:
        render(outcome)


def _probe_local(place: Place) -> str | None:
    if place.host is not None:
        return None
    from vmigrate.transfer.disks import probe_format
    return probe_format(Path(place.path))


