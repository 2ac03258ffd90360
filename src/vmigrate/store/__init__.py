"""Durable controller state in SQLite."""

from vmigrate.store.db import Store, VmRecord

__all__ = ["Store", "VmRecord"]
