"""The lab, the image build, the assessment and the transfer ends report vmigrate.progress
Events; the agent's JSON lines stay what they were."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from vmigrate.config import Inventory
from vmigrate.lab import image, net
from vmigrate.progress import Event, sayer
from vmigrate.service.assess import Assessor
from vmigrate.store import Store
from vmigrate.transfer import agent, remote
from vmigrate.transfer.engine import Progress


class _Frozen(Progress):
    @property
    def elapsed(self) -> float:
        return 1.5


def _tally() -> Progress:
    return _Frozen(total=4096, done=1024, wire=700, sent=512, zero=256, skipped=256, resent=64)


def test_tally_as_event() -> None:
    ev = _tally().event()
    assert (ev.done, ev.total, ev.fraction) == (1024, 4096, 0.25)
    assert dict(ev.figures) == {"wire_bytes": 700, "data_bytes": 512, "zero_bytes": 256,
                                "skipped_bytes": 256, "resent_bytes": 64, "seconds": 1.5}
    assert ev.message is None


def test_agent_progress_line_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(agent, "_silenced", False)
    p = _tally()
    agent._progress(p.event())
    assert err.getvalue() == json.dumps({"event": "progress", **p.as_dict()}) + "\n"


def test_controller_reads_progress_line_as_event() -> None:
    p = _tally()
    line = json.loads(json.dumps({"event": "progress", **p.as_dict()}))
    line.pop("event")
    assert remote._progress_event(line) == p.event()
    odd = remote._progress_event({"done": "x", "total": True, "wire_bytes": None, "n": 3})
    assert (odd.done, odd.total, dict(odd.figures)) == (None, None, {"n": 3})


def test_lines_become_events() -> None:
    seen: list[Event] = []
    say = sayer(seen.append)  # what the lab's builders and teardown talk through
    say("building")
    assert seen == [Event(message="building")]
    sayer(None)("nobody listens")


def test_a_failing_display_does_not_stop_the_lab() -> None:
    calls: list[Event] = []

    def broken(ev: Event) -> None:
        calls.append(ev)
        raise RuntimeError("display gone")

    say = sayer(broken)
    say("one")
    say("two")
    assert calls == [Event(message="one")]  # switched off after the first failure
    assert net.sayer is sayer and image.sayer is sayer  # the lab uses this one


async def test_assessor_notes_are_events(tmp_path: Path) -> None:
    seen: list[Event] = []
    async with Assessor(Inventory(), Store(tmp_path / "db"), progress=seen.append) as a:
        a.note("vm1: probing the link")
    assert seen == [Event(message="vm1: probing the link")]
