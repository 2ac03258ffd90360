"""A planned wave kept in the store: :func:`store_wave` turns a
:class:`~vmigrate.plan.fleet.Schedule` into a ``waves`` row and its ``wave_moves``.

Each move keeps its place in the schedule's start order, its start and end in the
schedule, and the bandwidth cap it runs with: the *least* bandwidth the schedule
allocates it over its life. The engine offers no way to change a running migration's
cap (see :mod:`vmigrate.fleet.run`), so a move keeps the cap it starts with; the least
of its allocations is the one that stays within every link's allowance at every instant
the schedule has it in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmigrate.plan.fleet import Entry, Schedule
from vmigrate.store import Store, WaveMoveSpec, WaveRecord

__all__ = ["WIRE_OVERHEAD", "move_cap", "store_wave"]


#: what a link carries per byte of a migration's allowance, and the headroom a move
#: needs below it: TCP/IP and Ethernet headers (a full 1514-byte frame holds 1448 bytes
#: of TCP payload), TLS records, QEMU's rate limiter (each 100 ms window's quota goes
#: out at once), and above all the switchover, which QEMU runs unthrottled (the last
#: dirty pages go at link speed, up to the downtime limit's worth). Lab, 2026-12-08,
#: 100 mbit downlinks with an 80 mbit budget, one move per link at a time: capped at
#: the allocation, the busiest 1 s averages were 86 mbit; at allocation / 1.08, 79.6 to
#: 81.4 mbit, and once above the 5 % tolerance in a fresh-clone CI run. The cap is the
#: allocation divided by this
WIRE_OVERHEAD = 1.2


def move_cap(entry: Entry) -> int:
    """The bandwidth cap (bytes/s of stream, at least 1) a move runs with: the least
    positive allocation the schedule gives it (else its floor), which is link bandwidth,
    over :data:`WIRE_OVERHEAD`."""
    positive = [r for _, r in entry.allocations if r > 0]
    cap = min(positive) if positive else entry.floor
    return max(1, int(cap / WIRE_OVERHEAD))


def store_wave(store: Store, schedule: Schedule, *, kind: str, host: str | None = None,
               modes: Mapping[str, str] | None = None,
               options: Mapping[str, Any] | None = None) -> WaveRecord:
    """Keep ``schedule`` as a new wave in state ``planned`` (its moves ``pending``, in
    its start order; a tie keeps the schedule's order). ``modes``: each VM's migration
    mode (default ``live``); ``options``: the
    :class:`~vmigrate.service.migrations.MigrationRequest` fields every move shares
    (``policy``, ``tls`` ...; not ``vm``, ``dest``, ``mode`` or ``bandwidth``).
    :class:`~vmigrate.errors.UserError` for an empty schedule or an unknown kind."""
    modes = modes or {}
    entries = sorted(enumerate(schedule.entries), key=lambda ie: (ie[1].start_s, ie[0]))
    moves = [WaveMoveSpec(
        vm=e.vm, src=e.src, dst=e.dst, mode=modes.get(e.vm, "live"),
        plan_start_s=e.start_s, plan_end_s=e.end_s, bandwidth=move_cap(e),
        predicted_time_s=e.end_s - e.start_s, predicted_downtime_ms=e.downtime_ms,
        predicted_bytes=int(e.estimate.bytes)) for _, e in entries]
    plan = {"schedule": schedule.to_json(),
            "moves": [{"vm": m.vm, "src": m.src, "dst": m.dst, "mode": m.mode,
                       "bandwidth": m.bandwidth} for m in moves]}
    return store.create_wave(kind, plan, moves, host=host, eta_s=schedule.makespan_s,
                             options=dict(options or {}))
