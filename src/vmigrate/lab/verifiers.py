"""The lab guest's verifiers: proof from inside and outside the guest that it moved
intact.

The lab guest (:mod:`vmigrate.lab.image`) runs workloads that check themselves
and print their verdicts on the serial console; the lab's probe namespace sits
on the VM network. These verifiers plug into the engine's hooks
(:mod:`vmigrate.migration.verify`):

* :class:`GuestReady` -- cold/warm: the guest booted on the destination
  (``VMIGRATE READY``);
* :class:`PingProbe` -- a 1 ms ping from the probe namespace across the switch:
  the observed downtime (the longest silence; for cold/warm, from the source
  stop to the first answer), whether the guest answers on the destination, and
  how long after the switch it first did;
* :class:`MemoryCheck` -- ``memtouch`` verifies every page on each pass: a pass
  that ran on the destination must say ``ok`` (live/online);
* :class:`DiskRecords` -- ``diskwrite`` writes sequence-numbered, checksummed
  records and prints the last one acknowledged: every acknowledged record must
  be on the disk the destination uses (every mode with raw disks), checked
  before the guest runs there when the mode allows it.

:func:`lab_verifiers` picks those that apply to a VM; the service layer calls it.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

from vmigrate.config import Inventory
from vmigrate.errors import LabError
from vmigrate.lab.probe import DowntimeProbe
from vmigrate.lab.records import last_acks, verify_diskwrite_records
from vmigrate.lab.workloads import parse_size, parse_workloads
from vmigrate.migration.job import Job
from vmigrate.migration.report import Check
from vmigrate.migration.verify import Verifier, find_guest_crash
from vmigrate.qemu.spec import VMSpec

_MEMCHECK = re.compile(
    r"MEMCHECK pass=(?P<pass>\d+) (?P<verdict>ok|FAIL).*|VMIGRATE WORKLOAD EXIT kind=memtouch.*")
#: the probe runs at most this much longer than the policy's timeout
_PROBE_SLACK_S = 120.0


def last_memcheck_pass(text: str) -> int:
    """The highest memtouch pass number in a console log (0 if none)."""
    return max((int(m.group("pass")) for m in _MEMCHECK.finditer(text) if m.group("pass")),
               default=0)


def _kinds(spec: VMSpec) -> set[str]:
    return {w.kind for w in parse_workloads(spec.workload)} if spec.workload else set()


class GuestReady(Verifier):
    """Cold and warm: the guest booted on the destination and says so."""

    name = "guest-ready"
    waits_for_boot = True

    async def after_switch(self, job: Job) -> Check | None:
        if job.state.memory != "offline" or not job.state.source_was_running:
            return None
        t0 = time.monotonic()

        async def ready() -> bool:
            text = await job.dst.console(job.vm, offset=job.state.dest_log_from)
            return "VMIGRATE READY" in text

        ok = await job.wait_until(ready, job.timing.boot_wait_s)
        return Check(name=self.name, ok=ok, seconds=round(time.monotonic() - t0, 3),
                     detail="booted on the destination" if ok else
                     f"did not boot on {job.dst.name} within {job.timing.boot_wait_s:.0f}s")


class PingProbe(Verifier):
    """A 1 ms ping across the switch (see the module doc)."""

    name = "ping"
    waits_for_boot = True

    def __init__(self, netns: str, address: str) -> None:
        self.netns = netns
        self.address = address
        self.probe: DowntimeProbe | None = None

    async def before_switch(self, job: Job) -> None:
        seconds = job.opts.policy.timeout_s + _PROBE_SLACK_S
        if job.state.memory == "offline":
            seconds += job.opts.shutdown_timeout
        self.probe = DowntimeProbe(self.netns, self.address, max_seconds=seconds)
        self.probe.start()

    async def after_switch(self, job: Job) -> Check | None:
        if not job.state.source_was_running:
            return None
        t0 = time.monotonic()
        answered, how = False, "no probe ran across the switch (recovered job)"
        if self.probe is not None:
            try:
                await asyncio.to_thread(self.probe.wait_reply, job.timing.ping_wait_s,
                                        self.probe.replies() + 1)
                answered, how = True, "answered the 1 ms probe"
            except LabError as exc:
                how = str(exc)
        if not answered:
            # the long-running ping may have backed off while the guest was down for
            # long, or ended at its deadline: ask once more with fresh pings
            answered = await self._fresh_ping(job.timing.ping_wait_s)
            if answered:
                how = "answered a fresh ping"
                job.decision("answered-fresh-ping")
        answered_at = time.time()
        await self._stop(job, answered, answered_at)
        job.report.verification.answers_ping = answered
        if not answered:
            job.decision("no-ping-reply", error=how)
        return Check(name=self.name, ok=answered, detail=how,
                     seconds=round(time.monotonic() - t0, 3))

    async def _stop(self, job: Job, answered: bool, answered_at: float) -> None:
        probe, self.probe = self.probe, None
        if probe is None:
            return
        result = await probe.astop()
        report = job.report
        st = job.state
        report.probe = {"sent": result.sent, "received": result.received,
                        "duration_s": round(result.duration_s, 3),
                        "deadline_hit": result.deadline_hit,
                        "longest_gap_ms": round(result.longest_gap_ms, 1),
                        "gap_start": result.gap_start, "last_reply": result.last_reply}
        first = probe.first_reply_after(st.pnr_at) if st.pnr_at else None
        if first is not None and st.pnr_at is not None:
            report.answer_after_switch_ms = round(max(0.0, first - st.pnr_at) * 1000, 1)
        if st.memory == "offline" and st.stopped_at is not None:
            # downtime: from the source stop to the guest answering here
            until = first if first is not None else answered_at
            report.observed_downtime_ms = round((until - st.stopped_at) * 1000, 1)
            return
        report.observed_downtime_ms = round(result.longest_gap_ms, 1)
        if not answered and result.last_reply:
            # silent since its last reply: that silence is the downtime so far
            report.observed_downtime_ms = round(max(
                result.longest_gap_ms, (time.time() - result.last_reply) * 1000.0), 1)

    async def _fresh_ping(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.netns, "ping", "-n", "-c", "1", "-W", "1",
                self.address, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() == 0:
                return True
        return False

    async def close(self, job: Job) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            await probe.astop()


class MemoryCheck(Verifier):
    """memtouch: a pass that ran on the destination verified every page (live,
    online; a cold or warm guest boots afresh, with fresh memory)."""

    name = "memcheck"

    async def before_switch(self, job: Job) -> None:
        if job.state.memory != "precopy":
            return
        text = await job.src.console(job.vm, lines=200)
        job.state.notes[self.name] = {"source_pass": last_memcheck_pass(text)}
        job.save()

    async def after_switch(self, job: Job) -> Check | None:
        if job.state.memory != "precopy":
            return None
        v = job.report.verification
        after = int(job.state.notes.get(self.name, {}).get("source_pass", 0))
        t0 = time.monotonic()
        deadline = t0 + job.timing.memcheck_wait_s
        text = ""
        while time.monotonic() < deadline:
            text = await job.dst.console(job.vm, offset=job.state.dest_log_from)
            crash = find_guest_crash(text)
            if crash is not None:
                v.memcheck, v.memcheck_line = "fail", crash
                return Check(name=self.name, ok=False, detail=crash,
                             seconds=round(time.monotonic() - t0, 3))
            for m in _MEMCHECK.finditer(text):
                if m.group("pass") and int(m.group("pass")) <= after:
                    continue  # the source's passes (a console carried across)
                verdict = {"ok": "ok", "FAIL": "fail"}.get(m.group("verdict") or "", "exited")
                v.memcheck, v.memcheck_line = verdict, m.group(0).strip()
                job.decision("memcheck", verdict=verdict)
                return Check(name=self.name, ok=verdict == "ok", detail=v.memcheck_line,
                             seconds=round(time.monotonic() - t0, 3))
            await asyncio.sleep(1)
        v.memcheck = "none"
        v.console_tail = text.splitlines()[-20:]
        return Check(name=self.name, ok=None, seconds=round(time.monotonic() - t0, 3),
                     detail=f"no memory-check verdict within {job.timing.memcheck_wait_s:.0f}s")


def _record_size(spec: VMSpec, dev: str) -> int:
    """The record size the guest's diskwrite on ``dev`` uses (``size=``, 4 KiB)."""
    for w in parse_workloads(spec.workload or ""):
        params = w.effective_params()
        if w.kind == "diskwrite" and params.get("dev") == dev:
            return parse_size(str(params.get("size", "4096")), what="record size")
    return 4096


class DiskRecords(Verifier):
    """diskwrite: every record the guest acknowledged on the source is on the disk the
    destination uses (raw images; a qcow2 target is read by QEMU only)."""

    name = "disk-records"

    async def source_stopped(self, job: Job) -> Check | None:
        st = job.state
        t0 = time.monotonic()
        text = await job.src.console(job.vm)
        out: dict[str, dict[str, int]] = {}
        for dev, acked in last_acks(text).items():
            index = ord(dev[-1]) - ord("a") if dev.startswith("/dev/vd") else -1
            if not 0 <= index < len(st.dest_spec.disks):
                continue
            disk = st.dest_spec.disks[index]
            if disk.format != "raw":
                continue
            size = _record_size(st.spec, dev) * (acked + 1) + (1 << 20)
            data = await job.dst.read_head(disk.path, size)
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                found = verify_diskwrite_records(Path(f.name))
            out[dev] = {"acked": acked, "found": found}
        if not out:
            return None
        job.report.verification.records = out
        job.decision("disk-records", **out)
        lost = {d: r for d, r in out.items() if r["found"] < r["acked"]}
        detail = (f"acknowledged records missing on {job.dst.name}: {lost}" if lost else
                  ", ".join(f"{d}: {r['found']} found >= {r['acked']} acknowledged"
                            for d, r in out.items()))
        return Check(name=self.name, ok=not lost, detail=detail, when="source-stopped",
                     seconds=round(time.monotonic() - t0, 3))


def lab_verifiers(inventory: Inventory, spec: VMSpec) -> list[Verifier]:
    """The lab guest's verifiers that apply to ``spec``, in the order they run (a VM
    that is not a lab guest gets none)."""
    kinds = _kinds(spec)
    out: list[Verifier] = []
    if "diskwrite" in kinds:
        out.append(DiskRecords())
    if spec.workload is not None:
        out.append(GuestReady())
    if inventory.lab is not None and spec.ip:
        out.append(PingProbe(inventory.lab.probe_netns, spec.ip))
    if "memtouch" in kinds:
        out.append(MemoryCheck())
    return out
