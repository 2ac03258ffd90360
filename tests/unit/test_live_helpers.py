"""Pure helpers of the live-migration engine."""

from __future__ import annotations

from vmigrate.migration.live import last_memcheck_pass


def test_last_memcheck_pass() -> None:
    log = "boot\nMEMCHECK pass=1 ok\nVMIGRATE HEARTBEAT n=3\nMEMCHECK pass=12 ok\nMEMCHECK pa"
    assert last_memcheck_pass(log) == 12
    assert last_memcheck_pass("VMIGRATE READY\n") == 0
