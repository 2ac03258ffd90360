"""The disk sample's chunk picking and the link probe's ends, on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from vmigrate.transfer.disks import Range
from vmigrate.transfer.probe import SAMPLE_CHUNK, _picks

MiB = 1 << 20


def test_picks_spread_over_data_ranges_only() -> None:
    ranges = [Range(0, 4 * MiB), Range(4 * MiB, 60 * MiB, zero=True), Range(64 * MiB, 4 * MiB)]
    picks = _picks(ranges, 4)
    assert len(picks) == 4
    assert all(length == SAMPLE_CHUNK for _, length in picks)
    # two picks in each 4 MiB data range, none in the zero range
    assert [off // MiB for off, _ in picks] == [0, 2, 64, 66]


def test_picks_edge_cases() -> None:
    assert _picks([], 8) == []
    assert _picks([Range(0, 8 * MiB, zero=True)], 8) == []
    assert _picks([Range(0, 512 * 1024)], 8) == [(0, 512 * 1024)]  # shorter than a chunk
    many = _picks([Range(0, 1024 * MiB)], 32)
    assert len(many) == 32 and many[-1][0] == 31 * 32 * MiB


def _run(*args: str) -> list[dict[str, object]]:
    res = subprocess.run([sys.executable, "-m", "vmigrate", "transfer", *args],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]


def test_sample_counts_zero_and_compressible_data(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    with image.open("wb") as f:
        f.write(os.urandom(4 * MiB))  # incompressible
        f.write(b"\0" * (4 * MiB))  # allocated zeros: cost nothing on the wire
        f.write(b"text line " * (4 * MiB // 10) + b"\n" * (4 * MiB % 10))  # compresses
        f.truncate(64 * MiB)  # a hole after
    done = _run("sample", str(image), "--chunks", "12")[-1]
    assert done["event"] == "done"
    assert done["allocated"] == 12 * MiB and done["sampled"] == 12 * MiB
    assert done["zero"] == 4 * MiB
    assert 0.3 < float(done["ratio"]) < 0.36  # 4 of 12 MiB, plus a little for the text


def test_link_probe_on_loopback() -> None:
    async def go() -> tuple[dict[str, object], dict[str, object]]:
        sink = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmigrate", "transfer", "probe-sink", "--listen",
            "127.0.0.1:0", "--seconds", "0.5", stderr=asyncio.subprocess.PIPE)
        assert sink.stderr is not None
        port = json.loads(await sink.stderr.readline())["port"]
        send = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmigrate", "transfer", "probe-send", "--connect",
            f"127.0.0.1:{port}", "--seconds", "0.5", stderr=asyncio.subprocess.PIPE)
        s_err = (await send.communicate())[1]
        k_err = (await sink.communicate())[1]
        assert sink.returncode == 0 and send.returncode == 0
        return json.loads(k_err.splitlines()[-1]), json.loads(s_err.splitlines()[-1])

    got, sent = asyncio.run(go())
    assert got["event"] == "done" and float(got["rate"]) > 10e6  # loopback: far above 10 MB/s
    assert 0.4 < float(got["seconds"]) < 1.5
    assert int(sent["sent"]) >= int(got["bytes"])
