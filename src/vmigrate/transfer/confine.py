"""Where a transfer receiver may write, and how it opens what it writes.

A receiver runs as root on the destination host and writes what a stream tells
it to, so it is confined:

* **allowed directories**: the target must be a normalised absolute path under
  one of the directories its invocation allows (the controller passes the
  host's pools and its inventory ``transfer_dirs``); anything else is a
  :class:`~vmigrate.errors.UserError` before a byte is written;
* **no link is followed below an allowed directory**: the directories from the
  allowed one down to the target's are opened one by one with ``O_NOFOLLOW``
  and everything after that is relative to that open directory, so a directory
  swapped for a symbolic link meanwhile does not redirect the writes;
* **only regular files of its own**: the partial copy and its journal are
  opened with ``O_NOFOLLOW`` and must be regular files with one link; a
  symbolic link, a device, a FIFO, a directory or a hard link planted at those
  names is refused (:class:`~vmigrate.errors.ConflictError`) and left as it is;
* **overwriting is the receiver's decision** (its own ``--overwrite``): the
  final rename never replaces an existing target without it
  (``renameat2(RENAME_NOREPLACE)``), and with it replaces only a regular file.

Nothing here follows a symbolic link except the allowed directory's own path,
which is the operator's configuration.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Final

from vmigrate.errors import ConflictError, TransferError, UserError

PARTIAL_SUFFIX: Final = ".vmxfer-partial"
JOURNAL_SUFFIX: Final = ".vmxfer-journal"
_OPEN_FILE: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def normalised(path: str | os.PathLike[str], what: str = "path") -> PurePosixPath:
    """``path`` when it is absolute and normalised (no ``.``, ``..``, ``//`` or
    trailing ``/``); :class:`UserError` otherwise."""
    text = os.fspath(path)
    if "\0" in text or not text.startswith("/"):
        raise UserError(f"{what} {text!r} is not an absolute path")
    if os.path.normpath(text) != text or text.startswith("//"):
        raise UserError(f"{what} {text!r} is not normalised (write it without '.', '..', "
                        "'//' or a trailing '/')")
    return PurePosixPath(text)


def allowed_root(target: str | os.PathLike[str], allowed: Sequence[str | os.PathLike[str]]
                 ) -> tuple[PurePosixPath, PurePosixPath, PurePosixPath]:
    """(target, the allowed directory it lies under, its directory relative to that).

    A lexical check on normalised paths (the longest allowed directory wins).
    Raises :class:`UserError` for a target that is not normalised and absolute, that
    names no file, that uses one of the receiver's own suffixes, or that lies
    outside every allowed directory."""
    t = normalised(target, "target")
    if t.name in ("", ".", ".."):
        raise UserError(f"target {t} names no file")
    if len(os.fsencode(t.name + PARTIAL_SUFFIX)) > 255:
        raise UserError(f"target name {t.name!r} is too long")
    if t.name.endswith((PARTIAL_SUFFIX, JOURNAL_SUFFIX)):
        raise UserError(f"target {t} ends with a name the receiver keeps for itself")
    best: tuple[PurePosixPath, PurePosixPath] | None = None
    roots = [normalised(a, "allowed directory") for a in allowed]
    for root in roots:
        inside = t.parent == root or root in t.parent.parents
        if inside and (best is None or len(root.parts) > len(best[0].parts)):
            best = (root, t.parent.relative_to(root))
    if best is None:
        where = ", ".join(str(r) for r in roots) or "none"
        raise UserError(f"target {t} is outside the directories this host allows for "
                        f"transfers ({where}); add its directory to the host's pools or "
                        "transfer_dirs in the inventory")
    return t, best[0], best[1]


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class Destination:
    """The target's directory, opened without following links under the allowed
    directory, and the three names the receiver uses in it (target, partial,
    journal). Close it with :meth:`close` (or ``with``)."""

    def __init__(self, target: PurePosixPath, dir_fd: int) -> None:
        self.target = target
        self.dir_fd = dir_fd
        self.name = target.name
        self.partial_name = target.name + PARTIAL_SUFFIX
        self.journal_name = target.name + JOURNAL_SUFFIX

    @property
    def partial(self) -> Path:
        return Path(str(self.target) + PARTIAL_SUFFIX)

    @property
    def journal(self) -> Path:
        return Path(str(self.target) + JOURNAL_SUFFIX)

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def lstat(self, name: str) -> os.stat_result | None:
        """``name``'s own status in the directory (a link is not followed); None if
        absent."""
        try:
            return os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TransferError(f"cannot inspect {self.target.parent / name}: "
                                f"{exc.strerror}") from exc

    def check(self, *, overwrite: bool) -> None:
        """Refuse, before anything is written: an existing target (without
        ``overwrite``; with it, one that is not a regular file), and a partial copy
        or journal that is not a regular file with a single link. Raises
        :class:`ConflictError`; changes nothing."""
        st = self.lstat(self.name)
        if st is not None:
            if not overwrite:
                raise ConflictError(f"{self.target} already exists; remove it or pass "
                                    "--overwrite")
            if not stat.S_ISREG(st.st_mode):
                raise ConflictError(f"{self.target} is {_kind(st.st_mode)}; refusing to "
                                    "replace it even with --overwrite")
        for name in (self.partial_name, self.journal_name):
            st = self.lstat(name)
            if st is not None:
                _refuse_unless_own(self.target.parent / name, st)

    def open_file(self, name: str, *, create: bool) -> int:
        """A read-write descriptor of ``name`` (created 0600 if ``create``), opened
        with ``O_NOFOLLOW`` and checked to be a regular file with one link.
        :class:`ConflictError` for anything else (left untouched),
        :class:`TransferError` when it cannot be opened; None of the caller's data
        is written here."""
        path = self.target.parent / name
        st = self.lstat(name)
        if st is not None:  # refused without opening it: opening a device may act
            _refuse_unless_own(path, st)
        flags = os.O_RDWR | _OPEN_FILE | (os.O_CREAT if create else 0)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConflictError(f"{path} is a symbolic link: refused, and left as it "
                                    "is (remove it if it is yours)") from exc
            if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):
                raise ConflictError(f"{path} is not a regular file: refused") from exc
            raise TransferError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            _refuse_unless_own(path, os.fstat(fd))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def proc_path(self, fd: int) -> str:
        """A path naming the open file ``fd`` itself (for qemu-img and qemu-nbd, which
        take paths): ``/proc/<pid>/fd/<fd>`` reopens that file, whatever its name
        now points to."""
        return f"/proc/{os.getpid()}/fd/{fd}"

    def unlink(self, name: str) -> None:
        """Remove ``name`` (a link itself, never what it points to); absent is fine."""
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TransferError(f"cannot remove {self.target.parent / name}: "
                                f"{exc.strerror}") from exc

    def commit(self, *, overwrite: bool) -> None:
        """Rename the partial copy to the target and make the rename durable.

        Without ``overwrite`` an existing target is never replaced (atomically:
        :class:`ConflictError`, the partial copy stays); with it, only a regular file
        is. What holds after a failure: the partial copy and its journal are
        untouched."""
        if overwrite:
            st = self.lstat(self.name)
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise ConflictError(f"{self.target} is {_kind(st.st_mode)}; refusing to "
                                    "replace it")
            try:
                os.replace(self.partial_name, self.name, src_dir_fd=self.dir_fd,
                           dst_dir_fd=self.dir_fd)
            except OSError as exc:
                raise TransferError(f"cannot rename the copy to {self.target}: "
                                    f"{exc.strerror}") from exc
        else:
            _rename_noreplace(self.dir_fd, self.partial_name, self.name, self.target)
        try:
            os.fsync(self.dir_fd)
        except OSError as exc:
            raise TransferError(f"cannot sync {self.target.parent}: {exc.strerror}") from exc


def _refuse_unless_own(path: PurePosixPath | Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConflictError(f"{path} is {_kind(st.st_mode)}, not a file of this transfer: "
                            "refused, and left as it is (remove it if it is yours)")
    if st.st_nlink != 1:
        raise ConflictError(f"{path} has {st.st_nlink} hard links, so it is not a file of "
                            "this transfer alone: refused, and left as it is")


def open_destination(target: str | os.PathLike[str],
                     allowed: Sequence[str | os.PathLike[str]]) -> Destination:
    """Check ``target`` against ``allowed`` (:func:`allowed_root`) and open its
    directory: the allowed directory itself, then each directory below it with
    ``O_NOFOLLOW``. Raises :class:`UserError` (outside, missing, not a directory)
    or :class:`ConflictError` (a symbolic link on the way); writes nothing."""
    t, root, rel = allowed_root(target, allowed)
    try:
        fd = os.open(str(root), _OPEN_DIR)
    except OSError as exc:
        raise UserError(f"allowed directory {root} cannot be opened: {exc.strerror}"
                        ) from exc
    here = root
    try:
        for part in rel.parts:
            here = here / part
            try:
                nfd = os.open(part, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise UserError(f"{here} does not exist") from exc
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise ConflictError(f"{here} is a symbolic link: a transfer does not "
                                        "follow links below its allowed directory") from exc
                if exc.errno == errno.ENOTDIR:
                    raise UserError(f"{here} is not a directory") from exc
                raise UserError(f"cannot open {here}: {exc.strerror}") from exc
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return Destination(t, fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_RENAME_NOREPLACE: Final = 1


def _rename_noreplace(dir_fd: int, src: str, dst: str, target: PurePosixPath) -> None:
    """Rename ``src`` to ``dst`` in ``dir_fd`` unless ``dst`` exists (atomic)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        rc = fn(ctypes.c_int(dir_fd), os.fsencode(src), ctypes.c_int(dir_fd),
                os.fsencode(dst), ctypes.c_uint(_RENAME_NOREPLACE))
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise ConflictError(f"{target} appeared meanwhile; the copy stays as "
                                f"{target}{PARTIAL_SUFFIX} (rerun with --overwrite)")
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise TransferError(f"cannot rename the copy to {target}: {os.strerror(err)}")
    # a file system without RENAME_NOREPLACE: a hard link is refused if dst exists
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError as exc:
        raise ConflictError(f"{target} appeared meanwhile; the copy stays as "
                            f"{target}{PARTIAL_SUFFIX} (rerun with --overwrite)") from exc
    except OSError as exc:
        raise TransferError(f"cannot rename the copy to {target}: {exc.strerror}") from exc
    try:
        os.unlink(src, dir_fd=dir_fd)
    except OSError as exc:
        raise TransferError(f"cannot remove {src} after linking it: {exc.strerror}") from exc
