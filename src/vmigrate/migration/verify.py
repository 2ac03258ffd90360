"""Verifiers: plug-ins that check a migration from outside QEMU's own account.

A :class:`Verifier` has three hooks, called by the engine in every mode:

* :meth:`~Verifier.before_switch` -- right before the step that stops the guest on
  the source (``migrate`` for live/online, the shutdown for cold/warm); it may
  note what it will compare against later (in ``job.state.notes``, so that a
  recovery after a crash can still compare);
* :meth:`~Verifier.source_stopped` -- the guest no longer runs on the source and
  its disks are final where the destination will use them (live/online: QEMU
  reported the migration completed; cold/warm: the last copy is done), before
  the guest runs there when the mode allows it: a failed check here, before the
  point of no return, rolls the migration back;
* :meth:`~Verifier.after_switch` -- the guest runs on the destination; a failed
  check here means the VM moved but did not arrive intact: the job needs an
  operator (nothing is destroyed, the source is kept).

Each hook returns a :class:`~vmigrate.migration.report.Check` (or None when it
has nothing to say) and records its verdict in ``job.report.verification``.

Generic verifiers live here (they need nothing but the hypervisor seam); the
lab guest's (memory check, disk records, ping and downtime probe) live in
the lab package (``lab/verifiers.py``); the service layer picks them for a VM.
"""

from __future__ import annotations

import asyncio
import re
import time

from vmigrate.migration.job import Job
from vmigrate.migration.report import Check
from vmigrate.qemu.process import VmState

#: what a guest prints when it crashed
_CRASH = re.compile(
    r"Kernel panic - not syncing.*|kernel BUG at.*|BUG: .*|WARNING: CPU: .*"
    r"|Oops: .*|general protection fault.*|.*is not a head!")
#: what a Linux guest prints when it boots: after a live move, a sign it was reset
_BOOT = re.compile(r"Linux version \S+.*")


def find_guest_crash(text: str, *, boot_is_crash: bool = True) -> str | None:
    """The first console line telling that the guest crashed (or, with
    ``boot_is_crash``, booted afresh: a reset where it should have run on)."""
    for pattern in (_CRASH, _BOOT) if boot_is_crash else (_CRASH,):
        match = pattern.search(text)
        if match is not None:
            return match.group(0).strip()
    return None


class Verifier:
    """A check of a migration (see the module doc). Hooks are optional."""

    #: the check's name in the report
    name: str = "verifier"
    #: its after-switch wait is the guest booting (cold, warm): time that belongs to the
    #: migration (its downtime), not to checking it afterwards
    waits_for_boot: bool = False

    async def before_switch(self, job: Job) -> None:
        """Note what to compare against (in ``job.state.notes[self.name]``)."""

    async def source_stopped(self, job: Job) -> Check | None:
        """Check the guest's final state on the source side."""
        return None

    async def after_switch(self, job: Job) -> Check | None:
        """Check the guest on the destination."""
        return None

    async def close(self, job: Job) -> None:
        """Release what the verifier started (a probe), whatever happened."""


class DestinationRuns(Verifier):
    """The guest runs on the destination (a VM moved while stopped stays stopped)."""

    name = "destination-runs"

    async def after_switch(self, job: Job) -> Check | None:
        if not job.state.source_was_running:
            job.report.verification.dest_running = False
            return Check(name=self.name, ok=None,
                         detail="the VM was stopped and stays stopped on the destination")
        state = VmState.UNKNOWN
        for _ in range(3):  # a host or monitor that did not answer once may answer now
            state = await job.dst.vm_state(job.vm)
            if state != VmState.UNKNOWN:
                break
            await asyncio.sleep(job.timing.forward_retry_s)
        if state == VmState.UNKNOWN:
            return Check(name=self.name, ok=None,
                         detail=f"{job.dst.name} did not say what state the VM is in")
        ok = state == VmState.RUNNING
        job.report.verification.dest_running = ok
        return Check(name=self.name, ok=ok, detail=f"{job.dst.name}: {state.value}")


class ConsoleCrash(Verifier):
    """No kernel crash on the destination console since our QEMU started there; after a
    live move, no fresh boot banner either (the guest was reset). A guest booted
    afresh by a cold or warm move is expected to print one."""

    name = "console"

    async def after_switch(self, job: Job) -> Check | None:
        if not job.state.source_was_running:
            return None
        t0 = time.monotonic()
        text = await job.dst.console(job.vm, offset=job.state.dest_log_from)
        line = find_guest_crash(text, boot_is_crash=job.state.memory == "precopy")
        if line is None:
            return Check(name=self.name, ok=True, detail="no crash on the destination console",
                         seconds=round(time.monotonic() - t0, 3))
        job.report.verification.guest_crash = line
        job.report.verification.console_tail = text.splitlines()[-20:]
        job.decision("guest-crash", line=line)
        return Check(name=self.name, ok=False, detail=line,
                     seconds=round(time.monotonic() - t0, 3))


class CopiesVerified(Verifier):
    """Every disk copied by the transfer engine was verified in full on the
    destination before the guest may run from it (cold, warm)."""

    name = "disk-copies"

    async def source_stopped(self, job: Job) -> Check | None:
        figures = [d for d in job.report.disks if d.verified != "mirror"]
        if not figures or job.state.storage not in ("copy", "rounds"):
            return None
        bad = [d.target for d in figures if d.verified != "full"]
        if bad:
            return Check(name=self.name, ok=False, when="source-stopped",
                         detail=f"not verified in full: {', '.join(bad)}")
        return Check(name=self.name, ok=True, when="source-stopped",
                     detail=f"{len(figures)} disk(s) re-read and checked on {job.dst.name}")


def generic_verifiers() -> list[Verifier]:
    """The verifiers every migration runs, in order."""
    return [CopiesVerified(), DestinationRuns(), ConsoleCrash()]
