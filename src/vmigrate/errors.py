"""Errors raised by vmigrate.

Every error the package raises on purpose derives from :class:`VmigrateError`,
and says whose fault it is through its class:

``VmigrateError``
    ``UserError`` -- the caller's input is wrong; nothing was changed.
        ``ConfigError`` -- the inventory file is missing, unreadable or invalid.
        ``SpecError`` -- a VM spec is invalid (memory size, disk, host ...).
        ``NotFoundError`` -- a named VM, host or lab does not exist.
        ``StateError`` -- the object is in the wrong state for the request
          (VM already running, lab already up ...).
    ``EnvironmentError_`` -- this machine lacks something (root, a binary,
      the guest image); the message says what to install or run.
    ``HostError`` -- a host could not do what was asked.
        ``HostUnreachableError`` -- no SSH session could be opened.
        ``CommandError`` -- a command on the host exited non-zero; carries
          argv, exit status and stderr.
        ``NbdError`` -- an NBD server refused a request (carries the errno
          name it sent), broke the protocol, or the connection was lost.
    ``QemuError`` -- QEMU failed.
        ``QmpError`` -- a QMP command failed or the monitor went away.
        ``VmStartError`` -- QEMU exited before it came up.
        ``GuestTimeoutError`` -- the guest did not show the expected sign of life
          (a console line) in time.
    ``TransferError`` -- a disk transfer failed; what was committed stays on
      the receiver, and rerunning the transfer resumes it.
        ``TransferIntegrityError`` -- the stream did not authenticate (wrong
          key, altered frames) or the copy does not match its source; nothing
          was marked complete.
    ``LabError`` -- building or tearing down the lab failed.
    ``StoreError`` -- the state database is unreadable or of an unknown version.

Foreign errors (asyncssh, qemu.qmp, sqlite3, OSError) are translated at the
boundary where they are caught: ``raise Ours(...) from exc``.
``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence


class VmigrateError(Exception):
    """Root of every error vmigrate raises on purpose."""

    #: Process exit status the CLI uses for this class of error.
    exit_code: int = 1


class UserError(VmigrateError):
    """The request is wrong; nothing was changed."""

    exit_code = 2


class ConfigError(UserError):
    """The inventory file is missing, unreadable or invalid."""


class SpecError(UserError):
    """A VM spec is invalid."""


class NotFoundError(UserError):
    """A named VM, host or lab does not exist."""


class StateError(UserError):
    """The object is in the wrong state for the request."""


class EnvironmentError_(VmigrateError):
    """This machine lacks something vmigrate needs (root, a binary, an image)."""

    exit_code = 3


class HostError(VmigrateError):
    """A host could not do what was asked."""


class HostUnreachableError(HostError):
    """No session to the host could be opened."""


class CommandError(HostError):
    """A command on a host exited with a non-zero status."""

    def __init__(
        self, host: str, argv: Sequence[str], status: int | None, stderr: str
    ) -> None:
        self.host = host
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"on {host}: {argv[0] if argv else '?'} exited {status}: {tail}")


class NbdError(HostError):
    """An NBD export failed a request, sent garbage, or the connection was lost.

    ``errno``/``errno_name`` are set when the server replied with an error
    value (``EIO``, ``ENOSPC``, ...), and ``None`` for transport failures.
    """

    def __init__(
        self, message: str, errno: int | None = None, errno_name: str | None = None
    ) -> None:
        self.errno = errno
        self.errno_name = errno_name
        super().__init__(message)


class QemuError(VmigrateError):
    """QEMU failed."""


class QmpError(QemuError):
    """A QMP command failed, or the monitor connection was lost."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        self.error_class = error_class
        super().__init__(message)


class VmStartError(QemuError):
    """QEMU exited before the VM came up."""


class GuestTimeoutError(QemuError):
    """The guest did not show the expected sign of life in time."""


class TransferError(VmigrateError):
    """A disk transfer failed; committed chunks stay on the receiver for a resume."""


class TransferIntegrityError(TransferError):
    """Wrong key, an altered stream, or a copy that does not match its source."""

    exit_code = 6


class LabError(VmigrateError):
    """Building or tearing down the lab failed."""


class StoreError(VmigrateError):
    """The state database is unreadable or of an unknown version."""
