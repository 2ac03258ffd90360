"""A fast, predictable estimator for the fleet scheduler's tests
(:class:`~vmigrate.plan.fleet.estimate.Estimator`).

:class:`LinearEstimator` moves a VM at bandwidth ``b`` in ``setup_s + bytes / b``
seconds, ``bytes`` being its memory (live), its memory and disks (online) or its disks
(cold, warm). A live or online guest converges when ``b`` is at least ``margin`` times
its dirty rate (its :meth:`~LinearEstimator.min_bandwidth`); below that it goes
post-copy when it may (same time, ``postcopy_ms`` of downtime) and otherwise does not
converge (it gives up after ``give_up_s``). The downtime of a converged pre-copy is
``switchover_ms`` plus the time to send what the guest dirties in ``tail_s`` at ``b``.
Cold: the whole move is downtime; warm: ``cutover_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigrate.plan.fleet.estimate import Estimate
from vmigrate.plan.fleet.model import Host, Link, Vm

__all__ = ["LinearEstimator", "hosts", "links"]

GiB = 1 << 30


def links(*hosts: str, capacity: float = 125e6, budget: float = 0.8) -> list[Link]:
    """An uplink and a downlink (``NAME-up``, ``NAME-down``) for each of ``hosts``."""
    return [Link(f"{h}-{d}", capacity, budget) for h in hosts for d in ("up", "down")]


def hosts(n: int, memory: int = 64, **kw: object) -> list[Host]:
    """Hosts ``h1`` .. ``hN`` of ``memory`` GiB and 16 CPUs (``kw``: other fields)."""
    return [Host(f"h{i}", memory * GiB, 16, **kw) for i in range(1, n + 1)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class LinearEstimator:
    """See the module doc."""

    setup_s: float = 2.0
    margin: float = 1.25
    give_up_s: float = 600.0
    switchover_ms: float = 20.0
    postcopy_ms: float = 110.0
    tail_s: float = 0.5
    cutover_s: float = 12.0

    def min_bandwidth(self, vm: Vm) -> float:
        if vm.mode in ("cold", "warm"):
            return 0.0
        return vm.dirty_rate * self.margin

    def estimate(self, vm: Vm, bandwidth: float) -> Estimate:
        b = bandwidth
        if not b > 0:
            return Estimate(time_s=self.give_up_s, downtime_ms=0.0, bytes=0.0,
                            converges=False, note="no bandwidth")
        if vm.mode in ("cold", "warm"):
            time_s = self.setup_s + vm.disk_bytes / b
            down = time_s if vm.mode == "cold" else self.cutover_s
            return Estimate(time_s=time_s, downtime_ms=down * 1000, bytes=vm.disk_bytes,
                            converges=True, note=vm.mode)
        sent = vm.memory + (vm.disk_bytes if vm.mode == "online" else 0)
        time_s = self.setup_s + sent / b
        if b >= self.min_bandwidth(vm):
            tail = min(vm.working_set, vm.dirty_rate * self.tail_s)
            return Estimate(time_s=time_s, downtime_ms=self.switchover_ms + 1000 * tail / b,
                            bytes=sent, converges=True, note="pre-copy converges")
        if vm.postcopy:
            return Estimate(time_s=time_s, downtime_ms=self.postcopy_ms, bytes=sent,
                            converges=True, postcopy=True, note="post-copy")
        return Estimate(time_s=self.give_up_s, downtime_ms=0.0, bytes=b * self.give_up_s,
                        converges=False, note="the guest dirties faster than the share")
