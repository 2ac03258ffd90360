"""One progress event for every long operation: migrations, disk transfers, the lab,
the guest image build, assessments.

A long operation takes an optional :data:`ProgressFn` and calls it with an
:class:`Event` whenever there is something to show. The callback must be quick and
must not raise (a display that fails is the display's problem: see
:func:`guarded`); what an operation does never depends on it.

Fields, all optional:

``message``  a line for a person: a step begun, a decision taken, a note
``phase``    the migration phase (``begin`` ... ``confirm``) when there is one
``step``     the convergence step in effect (live/online), for a status column
``done``, ``total``
             units of the current piece of work, in bytes unless said otherwise
             (a disk copy: image bytes copied and to copy; a memory migration:
             bytes sent and bytes sent + bytes remaining)
``figures``  numbers of the moment for displays, by name (``mbps``,
             ``dirty_bytes_rate``, ``iteration``, ``wire_bytes`` ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Event", "ProgressFn", "Say", "guarded", "lines", "quiet", "sayer"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What a long operation reports as it goes (see the module doc)."""

    message: str | None = None
    phase: str | None = None
    step: str | None = None
    done: int | None = None
    total: int | None = None
    figures: Mapping[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """``done / total`` in 0..1, or None when there is no total."""
        if self.done is None or not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


ProgressFn = Callable[[Event], None]


def quiet(_event: Event) -> None:
    """A progress callback that shows nothing."""


def lines(say: Callable[[str], None]) -> ProgressFn:
    """A callback that passes each event's ``message`` (if any) to ``say``."""

    def on_event(event: Event) -> None:
        if event.message:
            say(event.message)

    return on_event


def guarded(fn: ProgressFn | None) -> ProgressFn:
    """``fn`` wrapped so that an exception it raises is logged once and dropped (and
    ``fn`` is not called again): a broken display never stops the work."""
    if fn is None:
        return quiet
    broken = False

    def on_event(event: Event) -> None:
        nonlocal broken
        if broken:
            return
        try:
            fn(event)
        except Exception:  # the display's failure, not the operation's
            broken = True
            _log.warning("progress display failed; it is switched off", exc_info=True)

    return on_event


#: a line of progress for a person
Say = Callable[[str], None]


def sayer(progress: ProgressFn | None) -> Say:
    """A function that sends a line of text to ``progress`` as ``Event(message=line)``
    (guarded: a display that fails is switched off, the work goes on)."""
    emit = guarded(progress)

    def say(line: str) -> None:
        emit(Event(message=line))

    return say
