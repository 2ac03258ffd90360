"""Errors raised by vmigrate.

Every error the package raises on purpose derives from :class:`VmigrateError`,
and says whose fault it is through its class:

``VmigrateError``
    ``UserError`` -- the caller's input is wrong; nothing was changed.
        ``ConfigError`` -- the inventory file is missing, unreadable or invalid.
        ``SpecError`` -- a VM spec is invalid (memory size, disk, host ...).
        ``NotFoundError`` -- a named VM, host or lab does not exist.
        ``ConflictError`` -- the request conflicts with the current state and was
          refused before anything changed (VM already running, VM locked by a
          job, lab already up, target image exists ...).
    ``StateError`` -- an object turned out to be in the wrong state while an
      operation was under way (a guest that did not power off, a client in the
      wrong state); something may have changed: the message says what holds.
    ``EnvironmentError_`` -- this machine lacks something (root, a binary,
      the guest image); the message says what to install or run.
    ``HostError`` -- a host could not do what was asked.
        ``HostUnreachableError`` -- no SSH session could be opened.
        ``HostKeyError`` -- the host's SSH key is not the one recorded for it
          (changed, or none recorded): nothing was run on it (exit status 7).
        ``CommandError`` -- a command on the host exited non-zero; carries
          argv, exit status and stderr.
        ``NbdError`` -- an NBD server refused a request (carries the errno
          name it sent), broke the protocol, or the connection was lost.
    ``QemuError`` -- QEMU failed.
        ``QmpError`` -- a QMP command did not succeed.
            ``QmpCommandError`` -- QEMU answered with an error; carries its class
              (``GenericError``, ``DeviceNotFound`` ...).
            ``QmpConnectionError`` -- the monitor could not be reached, went away,
              or did not answer in time; the command may or may not have run.
        ``VmStartError`` -- QEMU exited before it came up.
        ``GuestTimeoutError`` -- the guest did not show the expected sign of life
          (a console line) in time.
    ``TransferError`` -- a disk transfer failed; what was committed stays on
      the receiver, and rerunning the transfer resumes it.
        ``TransferIntegrityError`` -- the stream did not authenticate (wrong
          key, altered frames) or the copy does not match its source; nothing
          was marked complete.
        ``DestinationFullError`` -- the destination ran out of space (ENOSPC,
          EDQUOT); the partial copy is kept, and rerunning the transfer once there
          is room resumes it (exit status 8).
        ``TransferStalledError`` -- the stream moved no byte for its deadline
          (link cut, peer hung); what was committed stays, a rerun resumes.
    ``LabError`` -- building or tearing down the lab failed.
    ``StoreError`` -- the state database or the audit log is unreadable, of an
      unknown version, or cannot be written.
        ``AuditUnreadableError`` -- the audit log or the controller's audit key
          cannot be read at all (permissions, I/O): nothing could be checked, which
          is not evidence of tampering (exit status 9).
    ``MigrationError`` -- a migration job did not complete; its report, stored
      with the job, says where it stopped.
        ``MigrationFailed`` -- it failed before the point of no return and was
          rolled back: the source runs, the destination is clean.
        ``Cancelled`` -- the operator cancelled it before the point of no return;
          rolled back like a failure.
        ``NeedsOperator`` -- the outcome cannot be settled by vmigrate alone (the
          guest's memory is split between the hosts, or the checks after the
          switchover failed); nothing was destroyed and the VM stays locked until
          ``vmigrate job recover`` or ``vmigrate job resolve`` settles it.

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


class ConflictError(UserError):
    """The request conflicts with the current state; refused, nothing was changed."""


class StateError(VmigrateError):
    """An object was in the wrong state while an operation was under way; something
    may have changed (the message says what holds)."""


class EnvironmentError_(VmigrateError):
    """This machine lacks something vmigrate needs (root, a binary, an image)."""

    exit_code = 3


class HostError(VmigrateError):
    """A host could not do what was asked."""


class HostUnreachableError(HostError):
    """No session to the host could be opened."""


class HostKeyError(HostError):
    """The SSH host key a host offered is not the one recorded for it (inventory
    ``host_key``, or its ``known_hosts``), or none is recorded: the connection was
    closed before anything ran. ``known`` is empty when no key is recorded."""

    exit_code = 7

    def __init__(self, message: str, *, host: str, offered: str | None,
                 known: Sequence[str] = ()) -> None:
        self.host = host
        self.offered = offered
        self.known = list(known)
        super().__init__(message)


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
    """A QMP command did not succeed: see the two subclasses.

    ``error_class`` is QEMU's error class for a :class:`QmpCommandError` and
    None for a :class:`QmpConnectionError`.
    """

    error_class: str | None = None


class QmpCommandError(QmpError):
    """QEMU answered the command with an error of class ``error_class``."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        self.error_class = error_class
        super().__init__(message)


class QmpConnectionError(QmpError):
    """The monitor could not be reached, went away, or did not answer in time; the
    command may or may not have run.

    ``timed_out``: the connection is still there, only the answer did not come in
    time (QEMU's main loop may be blocked, e.g. on a post-copy page fault); the
    session stays usable (out-of-band commands still get through)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        self.timed_out = timed_out
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


class DestinationFullError(TransferError):
    """The destination ran out of space; the partial copy and its journal are kept, a
    rerun resumes once there is room."""

    exit_code = 8

    #: errno names that mean "no room": the file system or the user's quota is full
    ERRNOS = frozenset({"ENOSPC", "EDQUOT"})

    @classmethod
    def found_in(cls, exc: BaseException) -> bool:
        """Whether ``exc``, or an error it was raised from or while handling, says the
        destination is out of space (an ``OSError`` or an NBD reply with ENOSPC or
        EDQUOT)."""
        import errno as _errno

        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if isinstance(cur, cls):
                return True
            if isinstance(cur, OSError) and cur.errno is not None and \
                    _errno.errorcode.get(cur.errno) in cls.ERRNOS:
                return True
            if isinstance(cur, NbdError) and cur.errno_name in cls.ERRNOS:
                return True
            cur = cur.__cause__ or cur.__context__
        return False


class TransferStalledError(TransferError):
    """The transfer stream moved no byte, either way, for its deadline (the link was
    cut or the other end hung); what was committed stays, a rerun resumes."""


class LabError(VmigrateError):
    """Building or tearing down the lab failed."""


class StoreError(VmigrateError):
    """The state database or the audit log is unreadable, of an unknown version, or
    cannot be written."""


class AuditUnreadableError(StoreError):
    """The audit log or the controller's audit key could not be read (permissions, an
    I/O error, a key file that is not a key): nothing was checked or changed."""

    exit_code = 9


class MigrationError(VmigrateError):
    """A migration job did not complete; its stored report says where it stopped."""


class MigrationFailed(MigrationError):
    """Failed before the point of no return and rolled back: the source runs, the
    destination is clean."""


class Cancelled(MigrationError):
    """Cancelled by the operator before the point of no return; rolled back."""


class NeedsOperator(MigrationError):
    """Not settled: nothing was destroyed, the VM stays locked until an operator (or
    ``vmigrate job recover``) settles it."""

    exit_code = 4
