"""Disk images on a host: inspect, create, remove, measure and compare them.

Used by online migration, where QEMU's ``blockdev-mirror`` copies the disks over
NBD into the destination host's storage pool: the destination image is created
here beforehand, its pool is checked for room, and after the copy the target is
compared with the source and measured to prove it arrived thin.

Every function runs ordinary commands (``qemu-img``, ``df``, ``stat``, ``rm``)
through a :class:`~vmigrate.hosts.Host`, so it works on a ``LocalHost`` and an
``SSHHost`` alike. Paths are paths on that host and must be absolute (a relative
path would mean something else over SSH, and an absolute one can never be taken
for an option or a ``protocol:`` filename by ``qemu-img``).

Errors, by whose fault they are:

* a bad argument, or an image that is missing or unreadable:
  :class:`~vmigrate.errors.SpecError`, one line naming the host and the path;
* creating over an existing file: :class:`~vmigrate.errors.ConflictError`;
* ``qemu-img`` (or ``df``, ``stat``) not installed on the host:
  :class:`~vmigrate.errors.EnvironmentError_`;
* any other failing command: :class:`~vmigrate.errors.CommandError`; output the
  command printed but we cannot read: :class:`~vmigrate.errors.HostError`.

``qemu-img`` is always run with ``-U`` (``--force-share``) where it reads an
image, so it works while a running QEMU holds the image's lock. What it reads
then is a snapshot of a disk that may be changing.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Literal, TypeGuard

from vmigrate.errors import (
    CommandError,
    ConflictError,
    EnvironmentError_,
    HostError,
    SpecError,
)
from vmigrate.hosts import CommandResult, Host

__all__ = [
    "QCOW2_FIXED_OVERHEAD",
    "ImageFormat",
    "ImageInfo",
    "allocated_bytes",
    "compare_images",
    "create_image",
    "free_bytes",
    "image_info",
    "qcow2_overhead",
    "remove_image",
    "required_bytes",
    "target_path",
]

#: The image formats vmigrate creates.
ImageFormat = Literal["raw", "qcow2"]

_FORMATS: tuple[str, ...] = ("raw", "qcow2")

#: Fixed part of the qcow2 metadata estimate: header, L1 table, refcount table
#: and slack (qemu-img 7.2 measures 256 KiB for a 64 GiB image; we keep 1 MiB).
QCOW2_FIXED_OVERHEAD = 1 << 20

#: Exit status of a command the host's shell could not find.
_NOT_FOUND = 127

#: Our own exit status for "the file is already there" in the create script.
_EXISTS = 17


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` reports about one image.

    ``actual_size`` is the number of bytes the image file occupies on the host's
    filesystem (``actual-size``: allocated blocks, not the apparent file size).
    ``backing_file`` is set when the image is the top of a backing chain; its
    ``actual_size`` then covers the top layer only.
    """

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None = None


# --------------------------------------------------------------------------- pure


def _parse_image_info(path: str, text: str) -> ImageInfo:
    """Build an :class:`ImageInfo` from ``qemu-img info --output=json`` output.

    Raises ``ValueError`` when the text is not such output. A missing
    ``actual-size`` (some protocols do not report it) is taken as the virtual
    size, which errs on the side of more space needed.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fmt = data.get("format")
    virtual = data.get("virtual-size")
    if not isinstance(fmt, str) or not fmt:
        raise ValueError("no 'format' string")
    if not _is_count(virtual):
        raise ValueError("no non-negative integer 'virtual-size'")
    actual = data.get("actual-size", virtual)
    if not _is_count(actual):
        raise ValueError("'actual-size' is not a non-negative integer")
    backing = data.get("full-backing-filename", data.get("backing-filename"))
    if backing is not None and not isinstance(backing, str):
        raise ValueError("'backing-filename' is not a string")
    return ImageInfo(path, fmt, virtual, actual, backing or None)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_df_avail(text: str) -> int:
    """The byte count from ``df -B1 --output=avail`` output (a header line, then
    one number). Raises ``ValueError`` on anything else."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 2 or not lines[0].lower().startswith("avail"):
        raise ValueError(f"expected a header and one value, got {len(lines)} line(s)")
    value = lines[1]
    if not value.isdigit():  # also refuses "-" (no figure) and "12K" (not -B1)
        raise ValueError(f"not a byte count: {value!r}")
    return int(value)


def _parse_stat_allocated(text: str) -> int:
    """Allocated bytes from ``stat -c '%b %B'`` output: blocks times block size.
    Raises ``ValueError`` on anything else."""
    fields = text.split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise ValueError(f"expected '<blocks> <block size>', got {text.strip()!r}")
    blocks, block_size = (int(f) for f in fields)
    if block_size == 0:
        raise ValueError("block size 0")
    return blocks * block_size


def qcow2_overhead(virtual_size: int) -> int:
    """An upper estimate of the metadata a qcow2 image of ``virtual_size`` bytes
    needs when fully allocated, with the default 64 KiB clusters and 16-bit
    refcounts.

    One 8-byte L2 entry maps each 64 KiB cluster (1/8192 of the virtual size);
    one 2-byte refcount covers each cluster of the file (about 1/32768 of it);
    plus :data:`QCOW2_FIXED_OVERHEAD` for the header, L1 and refcount tables.
    ``qemu-img measure`` (7.2) reports 10.25 MiB for 64 GiB and 160.25 MiB for
    1 TiB; this gives 11 MiB and 161 MiB. It is an estimate for a space check,
    not a promise: images with other cluster sizes, snapshots or bitmaps need more.
    """
    if virtual_size < 0:
        raise SpecError(f"negative virtual size {virtual_size}")
    return -(-virtual_size // 8192) + -(-virtual_size // 32768) + QCOW2_FIXED_OVERHEAD


def required_bytes(info: ImageInfo, target_format: ImageFormat) -> int:
    """A conservative estimate of the space the target of a mirror of ``info``
    needs in ``target_format``.

    That is the source's allocated size (``actual_size``, which for a qcow2
    source already includes its own metadata) plus, for a qcow2 target,
    :func:`qcow2_overhead`; capped at what a fully allocated target could take
    (``virtual_size`` plus that overhead). A source with a backing file is
    mirrored flattened (``sync: full``), and its top layer's size says nothing
    about the chain below: it is counted as fully allocated. Raises
    :class:`SpecError` for an unknown format.
    """
    _check_format(target_format)
    overhead = qcow2_overhead(info.virtual_size) if target_format == "qcow2" else 0
    full = info.virtual_size + overhead
    if info.backing_file is not None:
        return full
    return min(info.actual_size + overhead, full)


def target_path(pool_dir: str, vm: str, disk_index: int, fmt: ImageFormat) -> str:
    """Where disk ``disk_index`` of ``vm`` lives in ``pool_dir``:
    ``<pool_dir>/<vm>-disk<index>.<fmt>``. Raises :class:`SpecError` for a
    relative ``pool_dir``, a VM name that is not a plain file name part, a
    negative index or an unknown format."""
    _check_path(pool_dir, "pool directory")
    if not vm or "/" in vm or "\0" in vm or "\n" in vm or vm in (".", ".."):
        raise SpecError(f"VM name {vm!r} cannot be part of a file name")
    if disk_index < 0:
        raise SpecError(f"negative disk index {disk_index}")
    _check_format(fmt)
    return posixpath.join(pool_dir, f"{vm}-disk{disk_index}.{fmt}")


def _check_format(fmt: str) -> None:
    if fmt not in _FORMATS:
        raise SpecError(f"unsupported image format {fmt!r} (expected raw or qcow2)")


def _check_path(path: str, what: str = "image path") -> None:
    if not path.startswith("/") or "\0" in path or "\n" in path:
        raise SpecError(f"{what} must be an absolute path on the host, got {path!r}")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "no error output"


# --------------------------------------------------------------------------- on a host


def _need_tool(host: Host, res: CommandResult) -> None:
    """Raise :class:`EnvironmentError_` if ``res`` says the command is not installed."""
    if res.status == _NOT_FOUND:
        tool = res.argv[0] if res.argv else "?"
        hint = " (install qemu-utils)" if tool == "qemu-img" else ""
        raise EnvironmentError_(f"on {host.name}: {tool} is not installed{hint}")


def _unreadable(host: Host, res: CommandResult, what: str) -> HostError:
    return HostError(f"on {host.name}: cannot read the output of {res.argv[0]} ({what})")


async def image_info(host: Host, path: str, *, fmt: str | None = None) -> ImageInfo:
    """Inspect the image at ``path`` with ``qemu-img info -U``.

    ``fmt`` pins the format (``-f``) instead of letting qemu-img probe it; pass
    it when the VM spec says what the image is. Raises :class:`SpecError` when
    the image is missing or cannot be opened (as ``fmt``, if given), carrying
    qemu-img's first error line. Only reads; nothing on the host changes.
    """
    _check_path(path)
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt is not None:
        argv += ["-f", fmt]
    res = await host.run([*argv, path], check=False)
    _need_tool(host, res)
    if res.status == 1:
        raise SpecError(f"on {host.name}: cannot open image {path}: {_first_line(res.stderr)}")
    if res.status != 0:
        raise CommandError(host.name, res.argv, res.status, res.stderr)
    try:
        return _parse_image_info(path, res.stdout)
    except ValueError as exc:
        raise _unreadable(host, res, str(exc)) from exc


async def create_image(host: Host, path: str, fmt: ImageFormat, virtual_size: int) -> None:
    """Create a thin image of ``virtual_size`` bytes at ``path``, creating the
    parent directories.

    qcow2 is created with ``preallocation=off`` (default 64 KiB clusters), raw
    as a sparse file. An existing file (or dangling symlink) at ``path`` is never
    touched: :class:`ConflictError`. The check is atomic (the file is first
    created exclusively, then formatted), so two racing creators cannot both
    succeed. After any other failure no file is left at ``path``; directories
    made on the way are left behind. If the call is cancelled while qemu-img
    runs, a partial file may remain.
    """
    _check_path(path)
    _check_format(fmt)
    if virtual_size <= 0:
        raise SpecError(f"image size must be positive, got {virtual_size}")
    script = (
        'mkdir -p -- "$1" || exit 1\n'
        'if ! ( set -C; : > "$2" ); then\n'
        f'  if [ -e "$2" ] || [ -L "$2" ]; then exit {_EXISTS}; fi\n'
        "  exit 1\n"
        "fi\n"
    )
    res = await host.run(
        ["sh", "-c", script, "sh", posixpath.dirname(path) or "/", path], check=False)
    if res.status == _EXISTS:
        raise ConflictError(f"on {host.name}: {path} already exists; not overwriting it")
    if res.status != 0:
        raise CommandError(host.name, ["create", path], res.status, res.stderr)
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        argv += ["-o", "preallocation=off"]
    try:
        res = await host.run([*argv, path, str(virtual_size)], check=False)
        _need_tool(host, res)
        if res.status != 0:
            raise CommandError(host.name, res.argv, res.status, res.stderr)
    except Exception:
        # The placeholder is ours: take it away, but never hide the real error.
        await host.run(["rm", "-f", "--", path], check=False)
        raise


async def remove_image(host: Host, path: str) -> None:
    """Remove the image file at ``path``; a missing file is not an error.

    Raises :class:`CommandError` when ``rm`` fails (a directory, no permission);
    the file is then still there.
    """
    _check_path(path)
    await host.run(["rm", "-f", "--", path])


async def free_bytes(host: Host, directory: str) -> int:
    """Bytes available to unprivileged users on the filesystem that holds
    ``directory``, or would hold it: when it does not exist yet, its nearest
    existing parent is measured. Only reads."""
    _check_path(directory, "directory")
    script = (
        'd=$1\n'
        'while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done\n'
        'exec df -B1 --output=avail -- "$d"\n'
    )
    res = await host.run(["sh", "-c", script, "sh", directory], check=False)
    if res.status != 0:
        raise CommandError(host.name, ["df", directory], res.status, res.stderr)
    try:
        return _parse_df_avail(res.stdout)
    except ValueError as exc:
        raise _unreadable(host, res, str(exc)) from exc


async def allocated_bytes(host: Host, path: str) -> int:
    """Bytes the file at ``path`` occupies on the host's filesystem (allocated
    blocks times block size, from ``stat``): the measure of "arrived thin".
    Raises :class:`SpecError` when the file cannot be examined. Only reads."""
    _check_path(path)
    res = await host.run(["stat", "-L", "-c", "%b %B", "--", path], check=False)
    _need_tool(host, res)
    if res.status != 0:
        raise SpecError(f"on {host.name}: cannot examine {path}: {_first_line(res.stderr)}")
    try:
        return _parse_stat_allocated(res.stdout)
    except ValueError as exc:
        raise _unreadable(host, res, str(exc)) from exc


async def compare_images(
    host: Host,
    a: str,
    b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    timeout: float | None = None,
) -> bool:
    """Whether images ``a`` and ``b`` hold the same guest-visible content
    (``qemu-img compare -U``).

    The formats may differ (raw against qcow2); qemu-img probes them unless
    ``fmt_a``/``fmt_b`` are given. Unallocated and zeroed areas count as equal,
    and if the virtual sizes differ the larger image's extra part must read as
    zeroes. This reads both images whole, so ``timeout`` (seconds) defaults to
    none. Raises :class:`SpecError` when an image cannot be opened,
    :class:`CommandError` when reading fails. Only reads.
    """
    _check_path(a)
    _check_path(b)
    argv = ["qemu-img", "compare", "-U"]
    if fmt_a is not None:
        argv += ["-f", fmt_a]
    if fmt_b is not None:
        argv += ["-F", fmt_b]
    res = await host.run([*argv, a, b], check=False, timeout=timeout)
    _need_tool(host, res)
    if res.status in (0, 1):
        return res.status == 0
    if res.status == 2:  # qemu-img: "error on opening an image"
        raise SpecError(
            f"on {host.name}: cannot compare {a} with {b}: {_first_line(res.stderr)}")
    raise CommandError(host.name, res.argv, res.status, res.stderr)
