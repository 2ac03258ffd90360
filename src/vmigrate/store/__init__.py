"""Durable controller state in SQLite."""

from vmigrate.store.db import RUNNING, JobRecord, Store, VmRecord

__all__ = ["RUNNING", "JobRecord", "Store", "VmRecord"]
