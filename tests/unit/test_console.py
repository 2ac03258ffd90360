"""ConsoleFollower: each console line is seen once and whole, in order."""

from __future__ import annotations

from typing import Any, cast

import pytest

from vmigrate.errors import GuestTimeoutError
from vmigrate.service.vms import ConsoleFollower, VmService


class ScriptedConsole:
    """Stands in for VmService.console: returns a growing log, one step per call."""

    def __init__(self, logs: list[str]) -> None:
        self.logs = logs
        self.calls = 0

    async def console(self, name: str, lines: int | None = None) -> str:
        text = self.logs[min(self.calls, len(self.logs) - 1)]
        self.calls += 1
        return text


def follower(logs: list[str]) -> ConsoleFollower:
    return ConsoleFollower(cast(VmService, cast(Any, ScriptedConsole(logs))), "g")


async def test_lines_after_a_match_are_kept_for_the_next_wait() -> None:
    f = follower(["boot\nREADY\nHB 1\nHB 2\nMEM ok\n"])
    seen: list[str] = []
    assert (await f.wait("READY", interval=0, on_line=seen.append)).group(0) == "READY"
    assert (await f.wait(r"HB \d", interval=0, on_line=seen.append)).group(0) == "HB 1"
    assert (await f.wait("MEM", interval=0, on_line=seen.append)).group(0) == "MEM"
    assert seen == ["boot", "READY", "HB 1", "HB 2", "MEM ok"]


async def test_partial_line_waits_until_complete() -> None:
    f = follower(["REA", "READY\r\nx\n"])
    seen: list[str] = []
    await f.wait("READY", interval=0, on_line=seen.append)
    assert seen == ["READY"]


async def test_truncated_log_restarts() -> None:
    f = follower(["a\nb\n", "c\n"])
    await f.wait("b", interval=0)
    assert (await f.wait("c", interval=0)).group(0) == "c"


async def test_timeout_is_ours() -> None:
    f = follower(["nothing\n"])
    with pytest.raises(GuestTimeoutError):
        await f.wait("never", timeout=0.05, interval=0.01)
