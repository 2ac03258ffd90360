"""Durable controller state in SQLite."""

from vmigrate.store.db import (
    HOST_STATES,
    RUNNING,
    HostStateRecord,
    JobRecord,
    Store,
    VmRecord,
    WaveMoveRecord,
    WaveMoveSpec,
    WaveRecord,
)

__all__ = ["HOST_STATES", "RUNNING", "HostStateRecord", "JobRecord", "Store", "VmRecord",
           "WaveMoveRecord", "WaveMoveSpec", "WaveRecord"]
