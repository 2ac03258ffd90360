"""One fake migration between two fake VM processes, after QEMU 7.2.

The RAM stream's physics are :class:`~vmigrate.plan.simulate.SimulatedMigration`'s
(pre-copy passes, auto-converge, post-copy streaming, parameter checks); this
module adds what QEMU does around it: the connection, ``pause-before-switchover``,
the source stopping at the switch, the destination starting (or staying paused),
the incoming side exiting when the migration fails, post-copy pause and recovery,
and a link that is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from vmigrate.plan.simulate import SimulatedMigration

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._cluster import FakeCluster
    from vmigrate.testing.fakehv._model import FakeVm

__all__ = ["CANCELLABLE", "POSTCOPY", "TERMINAL", "FakeMigration"]

TERMINAL = frozenset({"completed", "failed", "cancelled"})
POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device"})


class FakeMigration:
    """A migration from ``source`` to ``dest`` (None: nobody listened on ``uri``).

    ``status`` is what the source's ``query-migrate`` says, ``dest_status`` what the
    destination's says; they differ only while a post-copy is paused on one side.
    ``switched``: the guest moved to the destination (post-copy started, or the
    migration completed) -- the point of no return.
    """

    def __init__(self, cluster: FakeCluster, source: FakeVm, dest: FakeVm | None, uri: str,
                 sim: SimulatedMigration) -> None:
        self.cluster = cluster
        self.source = source
        self.dest = dest
        self.uri = uri
        self.sim = sim
        self.status = "setup"
        self.dest_status = "setup" if dest is not None else "none"
        self.switched = False
        self.error: str | None = None
        #: the source guest ran when it was stopped for the switch (QEMU's global state)
        self.vm_was_running = False
        #: migrate-start-postcopy was asked for (it switches once the migration is active)
        self.postcopy_requested = False
        #: what continue_migration("pre-switchover") goes on to
        self.pending: Literal["complete", "postcopy"] | None = None
        #: the stream is down (a post-copy paused, or its connection cut)
        self.broken = False
        #: the destination host and port the stream is connected to (for a cut)
        self.target: tuple[str, int] | None = None
        self.started_tick = cluster.tick
        self.switch_tick: int | None = None
        self.ended_tick: int | None = None

    def __repr__(self) -> str:
        return (f"FakeMigration({self.source.name}: {self.source.host} -> "
                f"{self.dest.host if self.dest else '?'} {self.uri}, {self.status})")

    # -- what the sides see

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def dest_stalled(self) -> bool:
        """After the switch, the destination guest waits on pages that do not come."""
        if not self.switched or self.status == "completed" or self.dest is None:
            return False
        return (self.broken or self.dest_status != "postcopy-active"
                or not self.cluster.link_is_up(self.source.host, self.dest.host))

    def reply(self, side: Literal["source", "dest"]) -> dict[str, Any]:
        """``query-migrate`` of one side (QEMU gives the destination the status only)."""
        if side == "dest":
            return {"status": self.dest_status}
        if self.status == "setup":
            return {"status": "setup"}
        reply = self.sim.query_migrate()
        reply["status"] = self.status
        if self.status != "completed":
            reply.pop("downtime", None)
        if self.status == "failed" and self.error:
            reply["error-desc"] = self.error
        return reply

    # -- moving on

    def _up(self) -> bool:
        return self.dest is not None and self.cluster.link_is_up(self.source.host,
                                                                 self.dest.host)

    def _set(self, status: str, dest_status: str | None = None) -> None:
        changed = status != self.status
        self.status = status
        if dest_status is not None:
            self.dest_status = dest_status
        if changed:
            self.cluster._emit_migration(self.source, status)
            if self.dest is not None and dest_status is not None and self.dest.alive:
                self.cluster._emit_migration(self.dest, dest_status)
        if status in TERMINAL:
            self.ended_tick = self.cluster.tick

    def settle(self) -> None:
        """What happens without anyone asking (every tick): a connection comes up, a
        half-closed post-copy stream is noticed once the link is back, the device
        state is sent after ``migrate-continue``."""
        if self.ended:
            return
        if self.status == "setup" and self._up():
            self._establish()
        if self.broken and self._up():
            if self.status == "postcopy-active":
                self._set("postcopy-paused")
            if self.dest_status == "postcopy-active":
                self.dest_status = "postcopy-paused"
                assert self.dest is not None
                self.cluster._emit_migration(self.dest, "postcopy-paused")
        if self.status == "device" and self._up():
            self._complete()

    def advance(self, seconds: float) -> None:
        """Run the stream for ``seconds`` of simulated time (a ``query-migrate``)."""
        self.settle()
        if self.status not in ("active", "postcopy-active"):
            return
        if self.status == "active" and self.postcopy_requested:
            self._switch()
            if self.status != "postcopy-active":
                return
        if self.status == "postcopy-active" and (self.broken
                                                 or self.dest_status != "postcopy-active"):
            return
        assert self.dest is not None
        profile = self.cluster.guest(self.source.name)
        self.sim.dirty_rate = profile.dirty_rate
        self.sim.link_rate = (self.cluster.link_rate(self.source.host, self.dest.host)
                              if self._up() else 0.0)
        before, passes = self.sim.status, self.sim.iteration
        self.sim.advance(seconds)
        if self.sim.iteration > passes and self.source.capabilities.get("events", False):
            self.cluster._emit(self.source, "MIGRATION_PASS", {"pass": self.sim.iteration})
        if self.sim.status == "completed":
            if before == "postcopy-active":
                self._complete()
            elif self.source.capabilities.get("pause-before-switchover", False):
                self._stop_source()
                self.pending = "complete"
                self._set("pre-switchover")
            else:
                self._stop_source()
                self._complete()
        elif self.sim.status == "failed":
            self.fail(self.sim.error or "migration failed")

    def _establish(self) -> None:
        """The source connected to the listener: QEMU's checks at the handshake."""
        dest = self.dest
        assert dest is not None
        why = self.cluster._handshake_error(self.source, dest)
        dest.listen_uri = None  # QEMU closes the listener once the channels are in
        self.cluster._release_port(dest)
        if why is not None:
            self.dest_status = "failed"
            self.fail(why)
            return
        self._set("active", "active")

    def _stop_source(self) -> None:
        """The source stops for the switch (``finish-migrate``); QEMU keeps whether
        its guest ran, for the destination and for a failure."""
        src = self.source
        if src.run_state == "finish-migrate":
            return
        self.vm_was_running = src.run_state == "running"
        self.sim.stop_guest()
        src.memory_at_switch = src.memory
        self.cluster._set_run_state(src, "finish-migrate")

    def _switch(self) -> None:
        """Post-copy was asked for and the migration is active: switch now (or first
        pause before the switchover)."""
        self.postcopy_requested = False
        if self.source.capabilities.get("pause-before-switchover", False) and \
                self.pending is None:
            self._stop_source()
            self.pending = "postcopy"
            self._set("pre-switchover")
            return
        self._postcopy()

    def _postcopy(self) -> None:
        self.sim.start_postcopy()
        if self.sim.status == "failed":
            self.fail(self.sim.error or "post-copy failed")
            return
        self._stop_source()
        dest = self.dest
        assert dest is not None
        self.cluster._deactivate(self.source)
        self.switched = True
        self.switch_tick = self.cluster.tick
        dest.memory = dest.memory_at_start = self.source.memory
        dest.origin = "migration"
        self._set("postcopy-active", "postcopy-active")
        self.cluster._incoming_start(dest, self.vm_was_running)

    def _complete(self) -> None:
        src, dest = self.source, self.dest
        assert dest is not None
        self._stop_source()
        if not self.switched:
            dest.memory = dest.memory_at_start = src.memory
            dest.origin = "migration"
        self.cluster._deactivate(src)
        self.cluster._set_run_state(src, "postmigrate")
        dest.incoming = False
        self.cluster._release_port(dest)
        was_switched = self.switched
        self.switched = True
        if self.switch_tick is None:
            self.switch_tick = self.cluster.tick
        self._set("completed", "completed")
        if not was_switched:
            self.cluster._incoming_start(dest, self.vm_was_running)

    # -- what the controller asks

    def request_postcopy(self) -> None:
        """``migrate-start-postcopy`` (checked by the monitor): switches once active."""
        if self.status in ("setup", "active"):
            self.postcopy_requested = True
            if self.status == "active":
                self._switch()

    def continue_(self) -> None:
        """``migrate-continue`` from ``pre-switchover``."""
        if self.pending == "postcopy":
            self.pending = None
            self._postcopy()
            return
        self.pending = None
        self._set("device")

    def fail(self, reason: str, status: str = "failed") -> None:
        """The stream broke before the switch (or was cancelled): the source gets its
        guest back as QEMU does, the incoming QEMU exits."""
        if self.ended:
            return
        if self.switched:
            self.cut()
            return
        self.error = reason if status == "failed" else None
        src = self.source
        if src.alive and src.run_state == "finish-migrate":
            self.cluster._set_run_state(src, "running" if self.vm_was_running else "postmigrate")
        self._set(status)
        if self.dest is not None:
            self.dest_status = "failed"
            if self.dest.alive:
                self.cluster._exit(self.dest, f"incoming migration {status}")

    def cancel(self) -> None:
        self.fail("cancelled", status="cancelled")

    def cut(self) -> None:
        """The stream's connection is gone: before the switch the migration fails;
        after it both sides pause (the far side only notices over a working link)."""
        if self.ended:
            return
        if not self.switched:
            self.fail("Unable to write to socket: Connection reset by peer")
            return
        self.broken = True
        if self.status == "postcopy-active" or self.status == "postcopy-recover":
            self._set("postcopy-paused")
        if self._up() and self.dest_status in ("postcopy-active", "postcopy-recover"):
            self.dest_status = "postcopy-paused"
            assert self.dest is not None
            self.cluster._emit_migration(self.dest, "postcopy-paused")

    def pause(self, side: Literal["source", "dest"]) -> None:
        """``migrate-pause`` on one side (checked by the monitor): that side's socket
        is shut down; the other side notices when the link carries it."""
        self.broken = True
        if side == "source" or self._up():
            self._set("postcopy-paused")
        if side == "dest" or self._up():
            self.dest_status = "postcopy-paused"
            assert self.dest is not None
            self.cluster._emit_migration(self.dest, "postcopy-paused")

    def resume(self, host: str, port: int) -> bool:
        """``migrate`` with ``resume`` to the listener at ``host:port``: True when the
        destination was listening for the recovery there and the link works."""
        dest = self.dest
        if dest is None or not dest.alive or dest.recover_uri is None or not self._up():
            return False
        use = self.cluster.hosts[host].ports.get(port)
        if dest.host != host or use is None or use.pid != dest.pid or use.kind != "recover":
            return False
        if self.dest_status != "postcopy-paused":
            return False
        self.cluster._release_port(dest, recover=True)
        self.uri, dest.recover_uri = dest.recover_uri, None
        self.broken = False
        self.target = (host, port)
        self._set("postcopy-active", "postcopy-active")
        return True

    def peer_gone(self, side: Literal["source", "dest"]) -> None:
        """The process on ``side`` exited."""
        if self.ended:
            return
        if not self.switched:
            self.fail("Unable to write to socket: Connection reset by peer" if side == "dest"
                      else "source QEMU went away")
            return
        self.broken = True
        if side == "dest":
            self._set("postcopy-paused")
            self.dest_status = "failed"
        else:
            self.dest_status = "postcopy-paused"
            if self.dest is not None and self.dest.alive:
                self.cluster._emit_migration(self.dest, "postcopy-paused")
