"""``vmigrate transfer send|receive``: the two ends of a disk transfer, as the
controller starts them on hosts. ``python -m vmigrate transfer ...`` loads only
this module and the engine (a warm cutover waits for their start-up)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from vmigrate.errors import SpecError, UserError, VmigrateError
from vmigrate.transfer import agent
from vmigrate.transfer.crypto import CIPHERS
from vmigrate.transfer.engine import CHUNK_SIZE, SendOptions
from vmigrate.units import parse_tc_rate

app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True,
    help="The two ends of a disk transfer, as the controller starts them on hosts "
    "(over SSH; the key comes on stdin). Use 'vmigrate copy-disk' yourself.",
)

FormatOpt = Annotated[str, typer.Option("--target-format", help="raw or qcow2.")]

def _bandwidth(text: str | None) -> float | None:
    """``--bandwidth`` (tc rate syntax, at least 8kbit) in bytes/s; None: no cap."""
    if not text:
        return None
    rate = parse_tc_rate(text, what="bandwidth")
    if rate < 1000:
        raise SpecError(f"invalid bandwidth {text!r}: at least 8kbit")
    return rate


def _options(target_format: str, chunk_size: int, cipher: str, compress: str, verify: str,
             bandwidth: str | None, final: bool, overwrite: bool, window: int) -> SendOptions:
    if target_format not in ("raw", "qcow2"):
        raise UserError(f"--target-format must be raw or qcow2, not {target_format!r}")
    if cipher not in CIPHERS:
        raise UserError(f"--cipher must be one of {', '.join(CIPHERS)}")
    if compress not in ("auto", "off") and not compress.lstrip("-").isdigit():
        raise UserError("--compress is auto, off or a zstd level (1-19)")
    if verify not in ("full", "journal"):
        raise UserError("--verify is full or journal")
    if chunk_size < 65536 or chunk_size > 16 << 20 or chunk_size & (chunk_size - 1):
        raise UserError("--chunk-size is a power of two from 64 KiB to 16 MiB")
    return SendOptions(target_format=target_format, chunk_size=chunk_size, cipher=cipher,
                       compress=compress, bandwidth=_bandwidth(bandwidth),
                       verify=verify,  # type: ignore[arg-type]
                       final=final, overwrite=overwrite, window=window)


CipherOpt = Annotated[str, typer.Option(help="aes-256-gcm or sm4-gcm (if OpenSSL has it).")]
CompressOpt = Annotated[str, typer.Option(
    help="zstd: auto (level follows the bottleneck), off, or a fixed level.")]
VerifyOpt = Annotated[str, typer.Option(
    help="full: re-read and hash the whole copy at the end; journal: trust the ids "
    "checked as each chunk was written.")]
BandwidthOpt = Annotated[str | None, typer.Option(
    help="Cap, in tc rate syntax: 200mbit, 50MBps. Default: no cap.")]
ChunkOpt = Annotated[int, typer.Option(help="Chunk size in bytes (power of two).")]
WindowOpt = Annotated[int, typer.Option(help="Bytes in flight before waiting for acks.")]


@app.command("receive")
def receive(
    target: Annotated[str, typer.Argument(
        help="Where the image goes: a normalised absolute path under an --allow-dir.")],
    allow_dir: Annotated[list[str] | None, typer.Option(
        "--allow-dir", help="A directory the target may lie under (repeat it; at least "
        "one). The controller passes the host's pools and transfer_dirs.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing target (a regular file only). Only this flag decides, "
        "never the sender.")] = False,
    listen: Annotated[str | None, typer.Option(
        help="ADDRESS:PORT to accept the sender's TCP connection on (port 0: any); the "
        "first connection whose HELLO authenticates is the session.")] = None,
    stdio: Annotated[bool, typer.Option(
        help="The stream is on stdin/stdout, after the key line.")] = False,
) -> None:
    """Receive one transfer (run by the controller on the destination host).

    It writes only TARGET, TARGET.vmxfer-partial and TARGET.vmxfer-journal, under an
    allowed directory, opened without following symbolic links. Exit status: 0 done,
    1 failed (rerun resumes), 2 bad request (nothing written), 6 integrity failure.
    """
    if (listen is None) == (not stdio):
        raise UserError("give exactly one of --listen ADDRESS:PORT and --stdio")
    if not allow_dir:
        raise UserError("give at least one --allow-dir: the receiver writes nowhere else")
    allowed = [Path(d) for d in allow_dir]
    sys.exit(agent.run(lambda: agent.receive(Path(target), allowed=allowed,
                                             overwrite=overwrite, listen=listen)))


@app.command("send")
def send(
    source: Annotated[Path | None, typer.Option(help="Image file to send.")] = None,
    source_format: Annotated[str | None, typer.Option(help="raw or qcow2 (probed).")] = None,
    nbd: Annotated[str | None, typer.Option(
        help="Read from this NBD server instead (unix:PATH or tcp:HOST:PORT).")] = None,
    export: Annotated[str, typer.Option(help="NBD export name.")] = "",
    bitmap: Annotated[str | None, typer.Option(help="Dirty bitmap of the export.")] = None,
    delta: Annotated[bool, typer.Option(help="Send only what the bitmap marks dirty.")] = False,
    manifest: Annotated[Path | None, typer.Option(
        help="Chunk ids kept across rounds (written; read with --delta).")] = None,
    connect: Annotated[str | None, typer.Option(help="Receiver's ADDRESS:PORT.")] = None,
    stdio: Annotated[bool, typer.Option(help="The stream is on stdin/stdout.")] = False,
    target_format: FormatOpt = "raw",
    chunk_size: ChunkOpt = CHUNK_SIZE,
    cipher: CipherOpt = "aes-256-gcm",
    compress: CompressOpt = "auto",
    verify: VerifyOpt = "full",
    bandwidth: Annotated[str | None, typer.Option(help="Cap in bytes/s or tc syntax.")] = None,
    window: WindowOpt = 16 << 20,
    final: Annotated[bool, typer.Option(
        help="Last round: verify and rename. --no-final: an incremental round.")] = True,
) -> None:
    """Send one transfer (run by the controller on the source host)."""
    if (connect is None) == (not stdio):
        raise UserError("give exactly one of --connect ADDRESS:PORT and --stdio")
    bw = str(int(float(bandwidth) * 8)) + "bit" if bandwidth and bandwidth.isdigit() \
        else bandwidth
    opts = _options(target_format, chunk_size, cipher, compress, verify, bw, final, False,
                    window)
    source = source.absolute() if source is not None else None
    sys.exit(agent.run(lambda: agent.send(
        source=source, source_format=source_format, nbd=nbd, export=export, bitmap=bitmap,
        delta=delta, connect=connect, manifest=manifest, opts=opts)))


@app.command("probe-sink")
def probe_sink(
    listen: Annotated[str, typer.Option(
        help="ADDRESS:PORT to accept the probe's connection on (port 0: any).")],
    seconds: Annotated[float, typer.Option(help="How long to measure.")] = 2.0,
) -> None:
    """Measure the link: count what one sender delivers (run on the destination)."""
    if not 0.2 <= seconds <= 60:
        raise UserError("--seconds must be between 0.2 and 60")
    from vmigrate.transfer import probe
    sys.exit(agent.run(lambda: probe.sink(listen, seconds)))


@app.command("probe-send")
def probe_send(
    connect: Annotated[str, typer.Option(help="The sink's ADDRESS:PORT.")],
    seconds: Annotated[float, typer.Option(help="How long the sink measures.")] = 2.0,
) -> None:
    """Measure the link: send incompressible bytes to a probe sink (run on the source)."""
    from vmigrate.transfer import probe
    sys.exit(agent.run(lambda: probe.send(connect, seconds)))


@app.command("sample")
def sample(
    image: Annotated[Path, typer.Argument(help="Disk image to sample.")],
    image_format: Annotated[str | None, typer.Option(
        "--format", help="raw or qcow2 (probed).")] = None,
    chunks: Annotated[int, typer.Option(help="1 MiB chunks to read, spread over the data.")
                      ] = 32,
) -> None:
    """How well a disk's data would travel: zero and compressible share of a sample."""
    if chunks < 1:
        raise UserError("--chunks must be at least 1")
    from vmigrate.transfer import probe
    sys.exit(agent.run(lambda: probe.sample(image.absolute(), image_format, chunks)))


def main() -> None:
    """Entry point of the fast path: errors as one line, the exit status by class."""
    sys.argv = [f"{sys.argv[0]} transfer", *sys.argv[2:]]
    try:
        app()
    except VmigrateError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
