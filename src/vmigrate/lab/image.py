"""The lab guest image: a Debian kernel plus a busybox initramfs with workloads.

:func:`build_image` makes two files in the image directory:

``kernel``
    The kernel of Debian's ``linux-image-amd64`` (the real package it depends
    on is downloaded with ``apt-get download`` and unpacked, never installed).
    It is the ``vmlinuz`` bzImage as shipped, taken with ``-kernel``. (The
    uncompressed PVH ``vmlinux`` inside it boots a TCG guest in 3 s instead of
    9 s, but QEMU then writes the kernel straight into guest RAM, on the
    destination of a migration too: after a post-copy switch those pages are
    never fetched from the source, and the guest crashed in kernel text. With
    the bzImage, firmware copies the kernel in at boot and the destination's
    RAM stays empty until migrated.)
``initramfs.cpio.gz``
    A gzip'd newc cpio archive: the static busybox of ``busybox-static`` with
    its applet links, ``/init`` (``guest/init``), the virtio, ACPI button and
    evdev modules in load order, the workload programs ``/bin/memtouch`` and
    ``/bin/diskwrite``, and the helpers ``/bin/tlbtick`` and ``/bin/powerbtn``
    (``guest/*.c``, compiled with ``gcc -static``).  An ACPI power-down (QMP
    ``system_powerdown``) makes the guest stop its workloads, sync and power
    off, so QEMU exits.

A third file, ``image.json``, records what the image was built from: the
hash of the guest sources and the kernel package and version.  A build whose
inputs are unchanged returns at once.

The guest is configured on the kernel command line (:func:`kernel_cmdline`):
its address, gateway and workloads (:class:`Workload`; several run at once when
joined with ``+``, see :func:`parse_workloads`).  What the guest prints
on its console is documented in ``guest/init``, ``guest/memtouch.c`` and
``guest/diskwrite.c``; the records ``diskwrite`` writes are read back by
:mod:`vmigrate.lab.records`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import ipaddress
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from vmigrate.errors import EnvironmentError_, LabError, SpecError

__all__ = [
    "IMAGE_DIR_ENV",
    "WORKLOAD_DEFAULTS",
    "GuestImage",
    "Workload",
    "WorkloadKind",
    "build_image",
    "default_image_dir",
    "format_workloads",
    "image_paths",
    "kernel_cmdline",
    "parse_size",
    "parse_workload",
    "parse_workloads",
]

IMAGE_DIR_ENV = "VMIGRATE_IMAGE_DIR"

KERNEL_FILE = "kernel"
INITRD_FILE = "initramfs.cpio.gz"
STAMP_FILE = "image.json"

#: Bump when the way the image is assembled changes (it is part of the stamp).
BUILD_FORMAT = 3

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
#: Every file under ``guest/`` the image is made from: all are hashed into the stamp.
GUEST_SOURCES = ("init", "common.h", "memtouch.c", "diskwrite.c", "tlbtick.c", "powerbtn.c")
GUEST_PROGRAMS = ("memtouch", "diskwrite", "tlbtick", "powerbtn")
#: The modules the guest needs; their dependencies are added from ``depends=``.
#: ``button`` (ACPI power button) and ``evdev`` (its /dev/input/event node) let
#: ``/bin/powerbtn`` see an ACPI power-down (Debian builds both as modules).
ROOT_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "evdev", "button")

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------
# Workloads and the kernel command line
# ---------------------------------------------------------------------------

WorkloadKind = Literal["memtouch", "diskwrite", "idle"]
_KINDS: tuple[str, ...] = get_args(WorkloadKind)

#: What each workload uses for a parameter that is not given.
WORKLOAD_DEFAULTS: Mapping[str, Mapping[str, str]] = {
    "memtouch": {"wss": "64M", "rate": "0"},
    "diskwrite": {"dev": "/dev/vdb", "rate": "50", "size": "4096"},
    "idle": {},
}

#: How many workloads one guest may run at once (``memtouch+diskwrite+...``).
MAX_WORKLOADS = 4
#: What joins several workloads in their text form.
WORKLOAD_SEPARATOR = "+"

_SIZE_RE = re.compile(r"([0-9]{1,15})([KkMmGg]?)")
_INT_RE = re.compile(r"[0-9]{1,12}")
_DEV_RE = re.compile(r"/dev/[A-Za-z0-9_][A-Za-z0-9_./-]*")
_PARAM_RE = re.compile(r"[a-z]+")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30}


def parse_size(text: str) -> int:
    """Parse a size such as ``4096``, ``64K``, ``256M`` or ``1G`` (binary units).

    Raises :class:`SpecError` when ``text`` is not such a size.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise SpecError(f"bad size {text!r}: expected a number with an optional K, M or G")
    return int(m.group(1)) << _SHIFT[m.group(2).lower()]


def _parse_int(text: str, what: str) -> int:
    if _INT_RE.fullmatch(text) is None:
        raise SpecError(f"bad {what} {text!r}: expected a non-negative integer")
    return int(text)


def _check_wss(value: str) -> None:
    size = parse_size(value)
    if not 4096 <= size <= 1 << 40:
        raise SpecError(f"bad memtouch wss {value!r}: must be between 4K and 1024G")


def _check_memtouch_rate(value: str) -> None:
    _parse_int(value, "memtouch rate (pages per second)")


def _check_dev(value: str) -> None:
    if _DEV_RE.fullmatch(value) is None or ".." in value:
        raise SpecError(f"bad diskwrite dev {value!r}: expected a device path such as /dev/vdb")


def _check_diskwrite_rate(value: str) -> None:
    _parse_int(value, "diskwrite rate (records per second)")


def _check_record_size(value: str) -> None:
    size = parse_size(value)
    if size % 512 or not 512 <= size <= 1 << 20:
        raise SpecError(
            f"bad diskwrite size {value!r}: must be a multiple of 512 between 512 and 1M"
        )


_VALIDATORS: Mapping[str, Mapping[str, Callable[[str], None]]] = {
    "memtouch": {"wss": _check_wss, "rate": _check_memtouch_rate},
    "diskwrite": {
        "dev": _check_dev,
        "rate": _check_diskwrite_rate,
        "size": _check_record_size,
    },
    "idle": {},
}


@dataclass(frozen=True)
class Workload:
    """What the guest runs after boot, and with which parameters.

    ``params`` holds only the parameters that were given, as text (see
    :data:`WORKLOAD_DEFAULTS` and :meth:`effective_params` for the rest).
    Constructing a ``Workload`` validates it: an unknown kind, an unknown
    parameter or a bad value raises :class:`SpecError`.  ``str()`` gives the
    text form that :func:`parse_workload` reads back.
    """

    kind: WorkloadKind
    params: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise SpecError(f"unknown workload {self.kind!r}: expected one of {', '.join(_KINDS)}")
        allowed = _VALIDATORS[self.kind]
        for name, value in self.params.items():
            check = allowed.get(name)
            if check is None:
                known = ", ".join(allowed) or "none"
                raise SpecError(
                    f"unknown parameter {name!r} for workload {self.kind} (known: {known})"
                )
            check(value)

    def effective_params(self) -> dict[str, str]:
        """The parameters the guest program will use: defaults overlaid with ``params``."""
        return {**WORKLOAD_DEFAULTS[self.kind], **self.params}

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_workload(text: str) -> Workload:
    """Parse ``KIND[:name=value,...]``, e.g. ``memtouch:wss=256M,rate=50000``.

    Kinds: ``memtouch`` (``wss`` size, ``rate`` pages/s, 0 = flat out),
    ``diskwrite`` (``dev`` path, ``rate`` records/s, ``size`` bytes per record)
    and ``idle``.  Raises :class:`SpecError` on anything else.  One workload
    only: :func:`parse_workloads` reads several joined with ``+``.
    """
    kind, sep, rest = text.strip().partition(":")
    if kind not in _KINDS:
        raise SpecError(f"unknown workload {kind!r}: expected one of {', '.join(_KINDS)}")
    params: dict[str, str] = {}
    if sep:
        if not rest:
            raise SpecError(f"workload {text!r}: no parameters after ':'")
        for item in rest.split(","):
            name, eq, value = item.partition("=")
            if not eq or _PARAM_RE.fullmatch(name) is None or not value:
                raise SpecError(f"workload {text!r}: expected name=value, got {item!r}")
            if name in params:
                raise SpecError(f"workload {text!r}: parameter {name!r} given twice")
            params[name] = value
    return Workload(kind, params)  # type: ignore[arg-type]  # checked against _KINDS above


def _check_together(workloads: Sequence[Workload]) -> None:
    """Raise :class:`SpecError` unless ``workloads`` can run in one guest at once."""
    if not workloads:
        raise SpecError("no workload given")
    if len(workloads) > MAX_WORKLOADS:
        raise SpecError(f"{len(workloads)} workloads: at most {MAX_WORKLOADS} run at once")
    kinds = [w.kind for w in workloads]
    if len(workloads) > 1 and "idle" in kinds:
        raise SpecError("idle runs nothing: it cannot be joined with other workloads")
    if kinds.count("memtouch") > 1:
        raise SpecError("at most one memtouch workload per guest")
    devices: set[str] = set()
    for w in workloads:
        if w.kind == "diskwrite":
            dev = w.effective_params()["dev"]
            if dev in devices:
                raise SpecError(f"two diskwrite workloads on {dev}: give each its own dev=")
            devices.add(dev)


def parse_workloads(text: str) -> tuple[Workload, ...]:
    """Parse one workload or several joined with ``+``, each as :func:`parse_workload`.

    E.g. ``memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb``;
    the guest starts them all at once.  Raises :class:`SpecError` when a part
    is bad or empty, when there are more than :data:`MAX_WORKLOADS`, when
    ``idle`` is joined with anything, when ``memtouch`` appears twice, or when
    two ``diskwrite`` share a device (their default ``dev`` included).
    :func:`format_workloads` gives the text back.
    """
    parts = text.strip().split(WORKLOAD_SEPARATOR)
    if len(parts) > MAX_WORKLOADS:
        raise SpecError(
            f"workload {text!r}: {len(parts)} parts, at most {MAX_WORKLOADS} run at once"
        )
    workloads: list[Workload] = []
    for part in parts:
        if not part.strip():
            raise SpecError(f"workload {text!r}: empty part between '+'")
        workloads.append(parse_workload(part))
    _check_together(workloads)
    return tuple(workloads)


def format_workloads(workloads: Workload | Sequence[Workload]) -> str:
    """The text form :func:`parse_workloads` reads back (parts joined with ``+``).

    Raises :class:`SpecError` when the workloads cannot run together (the
    rules of :func:`parse_workloads`; an empty sequence included).
    """
    seq = (workloads,) if isinstance(workloads, Workload) else tuple(workloads)
    _check_together(seq)
    return WORKLOAD_SEPARATOR.join(str(w) for w in seq)


def kernel_cmdline(
    *,
    ip: str | None = None,
    gateway: str | None = None,
    workload: Workload | Sequence[Workload] | None = None,
    extra: str = "",
) -> str:
    """The kernel command line for the lab guest.

    ``ip`` is ``ADDR/PREFIX`` for eth0; ``gateway`` an address; ``workload``
    one workload or several to run at once (``vmigrate.workload=A+B``).
    Raises :class:`SpecError` when an address is malformed or the workloads
    cannot run together (see :func:`format_workloads`).  ``extra`` is
    appended as is.
    """
    # pti=on: under TCG, QEMU 7.2 misses guest writes made through TLB entries that
    # stay cached across a dirty-bitmap sync, so a busy guest's kernel data can arrive
    # stale (seen: oopses and hangs on the destination after multi-pass migrations,
    # 4 of 6 runs). Page-table isolation reloads CR3 at every kernel entry, which
    # flushes TCG's TLB; with it, 0 of 6. KVM tracks dirty pages in hardware.
    parts = ["console=ttyS0", "panic=-1", "pti=on"]
    if ip is not None:
        try:
            if "/" not in ip:
                raise ValueError("no prefix length")
            iface = ipaddress.ip_interface(ip)
        except ValueError as exc:
            raise SpecError(f"bad guest address {ip!r}: expected ADDR/PREFIX ({exc})") from exc
        parts.append(f"vmigrate.ip={iface.with_prefixlen}")
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError as exc:
            raise SpecError(f"bad gateway address {gateway!r}") from exc
        parts.append(f"vmigrate.gw={gw}")
    if workload is not None:
        parts.append(f"vmigrate.workload={format_workloads(workload)}")
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)


# ---------------------------------------------------------------------------
# Where the image lives
# ---------------------------------------------------------------------------


def default_image_dir() -> Path:
    """``$VMIGRATE_IMAGE_DIR``, or ``~/.cache/vmigrate/images``."""
    env = os.environ.get(IMAGE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vmigrate" / "images"


@dataclass(frozen=True)
class GuestImage:
    """The two files QEMU boots the lab guest from (``-kernel`` and ``-initrd``)."""

    kernel: Path
    initrd: Path


def _paths(image_dir: Path) -> GuestImage:
    return GuestImage(kernel=image_dir / KERNEL_FILE, initrd=image_dir / INITRD_FILE)


def image_paths(image_dir: Path | None = None) -> GuestImage:
    """The built image in ``image_dir`` (default :func:`default_image_dir`).

    Raises :class:`EnvironmentError_` when it has not been built.
    """
    directory = image_dir if image_dir is not None else default_image_dir()
    image = _paths(directory)
    if not (
        image.kernel.is_file() and image.initrd.is_file() and (directory / STAMP_FILE).is_file()
    ):
        raise EnvironmentError_(f"no lab guest image in {directory}: run 'vmigrate lab image'")
    return image


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def _guest_source(name: str) -> bytes:
    return resources.files("vmigrate.lab").joinpath("guest", name).read_bytes()


def _sources_digest() -> str:
    h = hashlib.sha256()
    h.update(f"vmigrate-guest-image format={BUILD_FORMAT} modules={ROOT_MODULES}\n".encode())
    for name in GUEST_SOURCES:
        data = _guest_source(name)
        h.update(f"{name} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def _run(argv: Sequence[str], what: str, *, cwd: Path | None = None) -> str:
    """Run a host command; return its stdout.

    Raises :class:`EnvironmentError_` when the program is missing and
    :class:`LabError` when it exits non-zero.
    """
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentError_(
            f"{argv[0]} not found: building the lab guest image needs a Debian host "
            "with apt, dpkg, gcc, libc6-dev and busybox-static"
        ) from exc
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        tail = lines[-1] if lines else "no error output"
        raise LabError(f"{what} failed: {argv[0]} exited {proc.returncode}: {tail}")
    return proc.stdout


def _apt_show(package: str) -> str | None:
    """``apt-cache show`` of the candidate version of ``package``; None when apt has none."""
    try:
        out = _run(["apt-cache", "show", "--no-all-versions", package], f"apt-cache show {package}")
    except LabError:
        return None
    return out if re.search(r"^Version:", out, re.MULTILINE) else None


def _resolve_kernel(metadata: str) -> tuple[str, str] | None:
    """``(package, version)`` from the ``Depends:`` of the metapackage's metadata."""
    m = re.search(r"^Depends:(.*)$", metadata, re.MULTILINE)
    if m is None:
        return None
    for dep in m.group(1).split(","):
        d = re.fullmatch(r"\s*(linux-image-[^\s|(]+)\s*(?:\(\s*=\s*([^\s)]+)\s*\))?\s*", dep)
        if d is None:
            continue
        package, version = d.group(1), d.group(2)
        if version is None:
            shown = _apt_show(package)
            v = re.search(r"^Version:\s*(\S+)", shown or "", re.MULTILINE)
            if v is None:
                continue
            version = v.group(1)
        return package, version
    return None


def _kernel_package(*, allow_update: bool, progress: Progress) -> tuple[str, str] | None:
    """``(package, version)`` of the kernel ``linux-image-amd64`` depends on.

    Runs ``apt-get update`` first when apt knows no candidate and
    ``allow_update``; returns None when there is still none (or, without
    ``allow_update``, when apt cannot tell).
    """
    metadata = _apt_show(KERNEL_METAPACKAGE)
    if metadata is None:
        if not allow_update:
            return None
        progress("apt knows no kernel package: running apt-get update")
        _run(["apt-get", "update"], "apt-get update")
        metadata = _apt_show(KERNEL_METAPACKAGE)
        if metadata is None:
            return None
    return _resolve_kernel(metadata)


def _read_stamp(image_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((image_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(image_dir: Path, digest: str, kernel: tuple[str, str] | None) -> bool:
    """Whether the image in ``image_dir`` was built from these inputs.

    ``kernel`` None means apt cannot say which kernel is current: the image
    is then accepted whatever kernel it holds.
    """
    image = _paths(image_dir)
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return False
    stamp = _read_stamp(image_dir)
    if stamp is None or stamp.get("format") != BUILD_FORMAT or stamp.get("sources") != digest:
        return False
    if kernel is None:
        return True
    built = (stamp.get("kernel_package"), stamp.get("kernel_version"))
    return built == kernel


@contextlib.contextmanager
def _build_lock(image_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the image directory (one build at a time)."""
    with (image_dir / ".build.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_image(
    image_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """Build the lab guest image into ``image_dir`` (default :func:`default_image_dir`).

    Returns at once when the image there was built from the same guest
    sources and the same kernel package version (unless ``force``).  Needs a
    Debian host with apt, dpkg-deb, gcc, libc6-dev and busybox-static; root
    is not needed unless ``apt-get update`` must run.  Concurrent builds into
    one directory wait for each other.

    Raises :class:`EnvironmentError_` when a tool is missing and
    :class:`LabError` when a step fails.  Everything is prepared in a
    temporary directory first; after a failure there the previous image (if
    any) is untouched.  Installing removes the stamp, replaces the kernel and
    initramfs atomically, and writes the stamp last, so a failure while
    installing leaves no image that :func:`image_paths` would hand out.
    """
    say: Progress = progress if progress is not None else (lambda _msg: None)
    directory = image_dir if image_dir is not None else default_image_dir()
    digest = _sources_digest()
    image = _paths(directory)

    if not force and _is_current(directory, digest, _quiet_kernel_package()):
        return image

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create image directory {directory}: {exc}") from exc
    with _build_lock(directory):
        say("resolving the kernel package")
        kernel = _kernel_package(allow_update=True, progress=say)
        if kernel is None:
            raise EnvironmentError_(
                f"apt knows no candidate for {KERNEL_METAPACKAGE}: check the apt sources"
            )
        if not force and _is_current(directory, digest, kernel):
            return image
        _check_busybox()
        with tempfile.TemporaryDirectory(prefix="vmigrate-image-") as tmp:
            stamp = _build(Path(tmp), directory, kernel, digest, say)
        say(f"image ready in {directory} (kernel {stamp['kernel_release']})")
    return image


def _quiet_kernel_package() -> tuple[str, str] | None:
    try:
        return _kernel_package(allow_update=False, progress=lambda _msg: None)
    except (EnvironmentError_, LabError):
        return None


def _build(
    tmp: Path, directory: Path, kernel: tuple[str, str], digest: str, say: Progress
) -> dict[str, Any]:
    package, version = kernel
    say(f"downloading {package} ({version})")
    debs = tmp / "debs"
    debs.mkdir()
    _run(
        ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
        f"downloading {package}",
        cwd=debs,
    )
    found = sorted(debs.glob("*.deb"))
    if len(found) != 1:
        raise LabError(f"apt-get download {package} left {len(found)} .deb files")
    say(f"unpacking {found[0].name}")
    root = tmp / "pkg"
    _run(["dpkg-deb", "-x", str(found[0]), str(root)], f"unpacking {found[0].name}")

    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise LabError(f"{package} holds {len(vmlinuz)} kernels in /boot, expected one")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    moddir = root / "lib" / "modules" / release / "kernel"
    if not moddir.is_dir():
        raise LabError(f"{package} has no modules directory for {release}")
    say(f"collecting modules of {release}")
    modules = _collect_modules(moddir, ROOT_MODULES)

    programs: dict[str, bytes] = {}
    for name in GUEST_PROGRAMS:
        say(f"compiling {name}")
        programs[name] = _compile(tmp, name)

    say("writing the initramfs")
    initrd = _initramfs(modules, programs)

    bzimage = vmlinuz[0].read_bytes()
    try:
        (directory / STAMP_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise LabError(f"cannot remove the old stamp in {directory}: {exc}") from exc
    _install(directory / KERNEL_FILE, bzimage)
    _install(directory / INITRD_FILE, initrd)
    stamp: dict[str, Any] = {
        "format": BUILD_FORMAT,
        "sources": digest,
        "kernel_package": package,
        "kernel_version": version,
        "kernel_release": release,
        "kernel_format": "bzimage",
        "modules": [name for name, _data in modules],
    }
    _install(directory / STAMP_FILE, (json.dumps(stamp, indent=2) + "\n").encode())
    return stamp


def _install(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise LabError(f"cannot write {path}: {exc}") from exc


def _check_busybox() -> None:
    """The host's busybox must be the static one (``busybox-static``)."""
    try:
        head = BUSYBOX.read_bytes()
    except OSError as exc:
        raise EnvironmentError_(
            f"no {BUSYBOX}: install busybox-static (apt-get install busybox-static)"
        ) from exc
    if not _is_static_elf(head):
        raise EnvironmentError_(
            f"{BUSYBOX} is dynamically linked: install busybox-static instead of busybox"
        )


def _program_headers(elf: bytes) -> list[tuple[int, int, int]] | None:
    """(p_type, p_offset, p_filesz) of each program header of a 64-bit little-endian
    ELF file; None when ``elf`` is not one or its headers run past its end."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    headers = []
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return None
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, base
        )
        headers.append((p_type, p_offset, p_filesz))
    return headers


def _is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF file without a PT_INTERP segment."""
    headers = _program_headers(data)
    return headers is not None and all(p_type != 3 for p_type, _o, _s in headers)


_MODINFO_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    """The uncompressed bytes of a kernel module (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    name = path.name
    try:
        if name.endswith(".ko"):
            return path.read_bytes()
        if name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise LabError(f"cannot read module {name}: {exc}") from exc
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise EnvironmentError_(f"{name} is zstd-compressed: install zstd")
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], capture_output=True, check=True
            ).stdout
        except subprocess.CalledProcessError as exc:
            raise LabError(f"cannot decompress {name}: zstd exited {exc.returncode}") from exc
    raise LabError(f"unknown module file type: {name}")


def _collect_modules(moddir: Path, roots: Sequence[str]) -> list[tuple[str, bytes]]:
    """The modules ``roots`` need, with their dependencies, in load order.

    Dependencies come from each module's ``depends=`` modinfo field.
    """
    index: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        if re.search(r"\.ko(\.(xz|gz|zst))?$", path.name):
            index.setdefault(_module_name(path), path)

    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise LabError(f"module dependency cycle through {name}")
        path = index.get(name)
        if path is None:
            raise LabError(f"module {name} is not in the kernel package (built in?)")
        visiting.add(name)
        data = _read_module(path)
        m = _MODINFO_DEPENDS.search(data)
        deps = m.group(1).decode() if m else ""
        for dep in filter(None, (d.strip().replace("-", "_") for d in deps.split(","))):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append((name, data))

    for root in roots:
        visit(root)
    return order


def _compile(tmp: Path, name: str) -> bytes:
    src = tmp / f"{name}.c"
    src.write_bytes(_guest_source(f"{name}.c"))
    (tmp / "common.h").write_bytes(_guest_source("common.h"))
    out = tmp / name
    if shutil.which("gcc") is None:
        raise EnvironmentError_("gcc not found: install gcc and libc6-dev")
    _run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)],
        f"compiling {name} (needs gcc and libc6-dev)",
    )
    return out.read_bytes()


# --- newc cpio ---------------------------------------------------------------

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000
_S_IFCHR = 0o020000


class _Cpio:
    """A newc ("070701") cpio archive built in memory; parents come first."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._names: set[str] = set()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            raise LabError(f"initramfs: {name} added twice")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.directory(parent)
        self._names.add(name)
        self._write_header(name, mode, data, rdev)

    def _write_header(self, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\x00"
        nlink = 2 if mode & 0o170000 == _S_IFDIR else 1
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\x00" * (-len(self._out) % 4)

    def directory(self, name: str, mode: int = 0o755) -> None:
        if name.strip("/") not in self._names:
            self._entry(name, _S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, _S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, _S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, _S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._write_header("TRAILER!!!", 0, b"", (0, 0))
        self._out += b"\x00" * (-len(self._out) % 512)
        return bytes(self._out)


def _initramfs(modules: Sequence[tuple[str, bytes]], programs: Mapping[str, bytes]) -> bytes:
    cpio = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc/vmigrate",
        "lib/modules",
    ):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = _run([str(BUSYBOX), "--list-full"], "listing busybox applets")
    for line in sorted(set(applets.split())):
        link = line.strip("/")
        if link and link != "bin/busybox" and not link.startswith("../"):
            cpio.symlink(link, "/bin/busybox")
    cpio.file("init", _guest_source("init"), 0o755)
    for name, data in programs.items():
        cpio.file(f"bin/{name}", data, 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("etc/vmigrate/modules", "".join(f"{n}\n" for n, _d in modules).encode())
    cpio.file("etc/hostname", b"vmigrate-guest\n")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
