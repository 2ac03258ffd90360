"""The hypervisor seam (:mod:`vmigrate.drivers.base`) and its drivers."""

from vmigrate.drivers.base import BlockJob, Driver, Monitor, NbdAddress

__all__ = ["BlockJob", "Driver", "Monitor", "NbdAddress"]
