"""Injected faults: what a test tells the fake cluster to go wrong, and where.

A :class:`Fault` is checked at the start of every driver, monitor and mover call
(before the call has any effect); the first one that matches and is not spent
decides what happens to the call. See :meth:`FakeCluster.inject
<vmigrate.testing.fakehv.FakeCluster.inject>` for the effect of each kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

__all__ = ["Call", "ControllerCrash", "Fault", "FaultKind", "Side"]

#: ``command``: the hypervisor/host/transfer refused; ``connection``: the channel was
#: lost; ``timeout``: no answer in time, the channel kept (a monitor whose main loop is
#: blocked); ``unreachable``: the host did not answer; ``crash``: the controller died;
#: ``cancel``: the operator asked to cancel (``on_cancel``) and the call goes on;
#: ``full``: a copy's destination ran out of space (mover calls only)
FaultKind = Literal["command", "connection", "timeout", "unreachable", "crash", "cancel",
                    "full"]
#: which seam a call belongs to
Side = Literal["driver", "monitor", "mover"]


class ControllerCrash(BaseException):
    """The controller died here (SIGKILL): nothing after it runs.

    A :class:`BaseException`, so no ``except Exception`` of the engine catches it:
    the test catches it, builds a fresh engine on the same cluster (the hosts, their
    VMs and running migrations are untouched) and runs its recovery.
    """


class Call(NamedTuple):
    """One recorded call: equal to the plain tuple ``(host, vm, method)``."""

    host: str
    vm: str | None
    method: str


@dataclass
class Fault:
    """One injected fault (see :meth:`FakeCluster.inject
    <vmigrate.testing.fakehv.FakeCluster.inject>`).

    A call *matches* when ``host``, ``vm``, ``call`` and ``side`` (each None: any)
    agree with it and ``when()`` (if set) is true at that moment. The first ``skip``
    matching calls pass; the next ``times`` matching calls are hit; then the fault
    is spent. ``fired`` counts the hits, ``seen`` the matching calls.

    ``after``: the call takes effect first and the fault strikes afterwards -- the
    command ran but its reply was lost (``connection``, ``unreachable``), the
    controller died right after the side effect (``crash``), or the cancel request
    arrived while the call ran (``cancel``). A copy hit with ``after`` writes part of
    the image to the partial target before it fails. ``command`` faults are refusals
    and never strike after the effect.
    """

    kind: FaultKind
    #: only calls to this host (a copy matches its source and its target host)
    host: str | None = None
    #: only this method name (``migrate``, ``start_vm``, ``copy`` ...)
    call: str | None = None
    #: extra condition checked at each call (e.g. the job's phase in the store)
    when: Callable[[], bool] | None = None
    #: let this many matching calls pass first
    skip: int = 0
    #: how many matching calls it hits, then it is spent
    times: int = 1
    #: kind ``cancel``: called (e.g. ``store.request_cancel``); the call then proceeds
    on_cancel: Callable[[], None] | None = None
    #: strike after the call took effect (see the class doc)
    after: bool = False
    #: only calls about this VM (monitor calls, and driver calls naming a VM)
    vm: str | None = None
    #: only calls of this seam
    side: Side | None = None
    fired: int = 0
    seen: int = field(default=0)

    def __post_init__(self) -> None:
        if self.kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.skip < 0 or self.times < 1:
            raise ValueError("a fault needs skip >= 0 and times >= 1")
        if self.after and self.kind == "command":
            raise ValueError("a refused command has no effect to strike after")
        if self.kind == "full" and self.side not in ("mover", None):
            raise ValueError("only a copy runs out of space: a 'full' fault is a mover's")
        if self.on_cancel is not None and self.kind != "cancel":
            raise ValueError("on_cancel belongs to faults of kind 'cancel'")

    @property
    def spent(self) -> bool:
        """It hit ``times`` calls and hits no more."""
        return self.fired >= self.times

    def matches(self, hosts: tuple[str, ...], vm: str | None, method: str, side: Side) -> bool:
        """Whether a call matches (``when`` included); does not count it."""
        if self.host is not None and self.host not in hosts:
            return False
        if self.vm is not None and self.vm != vm:
            return False
        if self.call is not None and self.call != method:
            return False
        if self.side is not None and self.side != side:
            return False
        return self.when is None or self.when()
