"""Pure helpers of the verifiers (generic and the lab guest's)."""

from __future__ import annotations

from vmigrate.lab.verifiers import last_memcheck_pass
from vmigrate.migration.verify import find_guest_crash


def test_last_memcheck_pass() -> None:
    log = "boot\nMEMCHECK pass=1 ok\nVMIGRATE HEARTBEAT n=3\nMEMCHECK pass=12 ok\nMEMCHECK pa"
    assert last_memcheck_pass(log) == 12
    assert last_memcheck_pass("VMIGRATE READY\n") == 0


def test_find_guest_crash() -> None:
    assert find_guest_crash("MEMCHECK pass=40 ok\nVMIGRATE HEARTBEAT n=3\n") is None
    oops = ("MEMCHECK pass=40 ok\n[   65.46] list_add corruption. next->prev should be prev\n"
            "[   65.46] kernel BUG at lib/list_debug.c:27!\n[   65.49] Kernel panic - not "
            "syncing: Fatal exception in interrupt\n")
    assert find_guest_crash(oops) == "kernel BUG at lib/list_debug.c:27!"
    reboot = "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists) #1 SMP\n"
    line = find_guest_crash(reboot)
    assert line is not None and line.startswith("Linux version 6.1.0-56-amd64")
    assert find_guest_crash("BUG: kernel NULL pointer dereference, address: 0\n") == (
        "BUG: kernel NULL pointer dereference, address: 0")


def test_verification_failed() -> None:
    from vmigrate.migration.report import Verification

    assert not Verification().failed
    assert not Verification(dest_running=True, memcheck="ok", answers_ping=True).failed
    assert not Verification(memcheck="none").failed  # no verdict is not a failure
    assert Verification(memcheck="fail").failed
    assert Verification(memcheck="exited").failed
    assert Verification(guest_crash="Kernel panic - not syncing: x").failed
    assert Verification(answers_ping=False).failed


def test_find_guest_crash_warnings_and_ring_corruption() -> None:
    text = ("[   55.22] WARNING: CPU: 0 PID: 0 at kernel/context_tracking.c:188 x+0x7a\n"
            "[   55.25] BUG: scheduling while atomic: swapper/0/0/0x00000101\n")
    assert find_guest_crash(text) == (
        "WARNING: CPU: 0 PID: 0 at kernel/context_tracking.c:188 x+0x7a")
    line = find_guest_crash("[ 55.26] virtio_net virtio1: output.0:id 1 is not a head!\n")
    assert line is not None and line.endswith("is not a head!")


def test_a_fresh_boot_is_expected_after_a_cold_move() -> None:
    boot = "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists) #1 SMP\n"
    assert find_guest_crash(boot, boot_is_crash=False) is None
    assert find_guest_crash(boot + "Kernel panic - not syncing: x\n",
                            boot_is_crash=False) == "Kernel panic - not syncing: x"
