"""The wave orchestrator: runs a schedule from :mod:`vmigrate.plan.fleet` through
:mod:`vmigrate.service`, durably.

``vmigrate.fleet.waves``
    :func:`store_wave`: a schedule kept as a ``planned`` wave in the store.
``vmigrate.fleet.run``
    :class:`WaveRunner`: runs a stored wave (several migrations at once, within the
    schedule's rules), retries what fails, and resumes after its controller died
    without migrating any VM twice (the write-ahead order is in its module doc).
"""

from vmigrate.fleet.run import (
    DEFAULT_BACKOFF,
    DEFAULT_RETRIES,
    EventFn,
    ServiceFactory,
    WaveRunner,
    wave_eta,
    wave_report,
)
from vmigrate.fleet.waves import move_cap, store_wave

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_RETRIES",
    "EventFn",
    "ServiceFactory",
    "WaveRunner",
    "move_cap",
    "store_wave",
    "wave_eta",
    "wave_report",
]
