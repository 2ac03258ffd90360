"""A typed QMP session on a VM's monitor socket, through any :class:`Host`.

Errors from qemu.qmp are translated here: a failed command raises
:class:`~vmigrate.errors.QmpCommandError` carrying QEMU's error class; a monitor that
cannot be reached, goes away or does not answer in time raises
:class:`~vmigrate.errors.QmpConnectionError`.
After either, the session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from vmigrate.errors import QmpCommandError, QmpConnectionError
from vmigrate.hosts import Host


class QmpSession:
    """One connected QMP client."""

    def __init__(self, client: QMPClient, vm: str) -> None:
        self._client = client
        self.vm = vm

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        oob: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        ``oob`` sends it out-of-band (answered even while QEMU's main loop is
        blocked, e.g. on a post-copy page fault). After ``timeout`` seconds without
        a reply, :class:`QmpConnectionError` is raised; the command may still run in QEMU.
        """
        try:
            return await asyncio.wait_for(
                self._client.execute(command, arguments, oob=oob), timeout)
        except TimeoutError as exc:
            raise QmpConnectionError(f"{self.vm}: no reply to {command} within {timeout}s",
                                     timed_out=True) from exc
        except ExecuteError as exc:
            raise QmpCommandError(f"{self.vm}: {command} failed: {exc}",
                                  exc.error_class) from exc
        except (QMPError, EOFError, OSError) as exc:
            raise QmpConnectionError(f"{self.vm}: monitor lost during {command}: {exc!r}"
                                     ) from exc

    async def execute_raw(self, message: Mapping[str, object]) -> dict[str, Any]:
        """Send a raw QMP message ``{"execute": ..., "arguments": ...}``; return the whole
        reply (``{"return": ...}`` or ``{"error": ...}``) as QEMU sent it."""
        command = message.get("execute")
        if not isinstance(command, str):
            raise QmpCommandError("a QMP command needs an 'execute' string")
        args = message.get("arguments")
        if args is not None and not isinstance(args, dict):
            raise QmpCommandError("'arguments' must be a JSON object")
        try:
            ret = await self._client.execute(command, args)
        except ExecuteError as exc:
            return {"error": {"class": exc.error_class, "desc": str(exc)}}
        except (QMPError, EOFError, OSError) as exc:
            raise QmpConnectionError(f"{self.vm}: monitor lost during {command}: {exc!r}"
                                     ) from exc
        return {"return": ret}

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventWaiter]:
        """Collect the named QMP events while the block runs."""
        listener = EventListener(names)
        self._client.register_listener(listener)
        try:
            yield EventWaiter(listener)
        finally:
            self._client.remove_listener(listener)

    async def query_status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``inmigrate``, ...)."""
        ret = await self.execute("query-status")
        return str(ret["status"])


class EventWaiter:
    """Events a :meth:`QmpSession.events` block collected, oldest first."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def wait(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return dict(await asyncio.wait_for(self._listener.get(), timeout))
        except TimeoutError:
            return None


@asynccontextmanager
async def qmp_session(
    host: Host, socket_path: str, *, vm: str = "vm", timeout: float = 10.0
) -> AsyncIterator[QmpSession]:
    """Connect to the QMP socket ``socket_path`` on ``host``."""
    async with host.unix_socket(socket_path) as local:
        client = QMPClient(vm)
        try:
            await asyncio.wait_for(client.connect(local), timeout)
        except (ConnectError, QMPError, OSError, TimeoutError) as exc:
            raise QmpConnectionError(
                f"{vm}: cannot connect to the QMP monitor on {host.name}: {exc}") from exc
        try:
            yield QmpSession(client, vm)
        finally:
            # a monitor that hung up (QEMU quit) or sent garbage (undecodable bytes, not
            # JSON) makes disconnect() re-raise what ended its reader; that is not an
            # error of the session's work, which raised QmpConnectionError already
            with contextlib.suppress(QMPError, EOFError, OSError, ValueError):
                await client.disconnect()
