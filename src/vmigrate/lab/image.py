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

The guest is configured on the kernel command line (its address, gateway
and workloads): see :mod:`vmigrate.lab.workloads`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vmigrate.errors import EnvironmentError_, LabError
from vmigrate.progress import ProgressFn, Say, sayer

__all__ = [
    "IMAGE_DIR_ENV",
    "GuestImage",
    "build_image",
    "default_image_dir",
    "image_paths",
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


def _kernel_package(*, allow_update: bool, say: Say) -> tuple[str, str] | None:
    """``(package, version)`` of the kernel ``linux-image-amd64`` depends on.

    Runs ``apt-get update`` first when apt knows no candidate and
    ``allow_update``; returns None when there is still none (or, without
    ``allow_update``, when apt cannot tell).
    """
    metadata = _apt_show(KERNEL_METAPACKAGE)
    if metadata is None:
        if not allow_update:
            return None
        say("apt knows no kernel package: running apt-get update")
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
    progress: ProgressFn | None = None,
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
    ``progress`` is told each step as an :class:`~vmigrate.progress.Event` with a
    ``message``.
    """
    say = sayer(progress)
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
        kernel = _kernel_package(allow_update=True, say=say)
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
        return _kernel_package(allow_update=False, say=lambda _line: None)
    except (EnvironmentError_, LabError):
        return None


def _build(
    tmp: Path, directory: Path, kernel: tuple[str, str], digest: str, say: Say
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
