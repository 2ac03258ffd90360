"""Unit tests for vmigrate.lab.workloads: workloads, sizes, the kernel command line."""

from __future__ import annotations

import pytest

from vmigrate.errors import SpecError
from vmigrate.lab.workloads import (
    WORKLOAD_DEFAULTS,
    Workload,
    format_workloads,
    kernel_cmdline,
    parse_size,
    parse_workload,
    parse_workloads,
)


@pytest.mark.parametrize(
    ("text", "kind", "params"),
    [
        ("memtouch", "memtouch", {}),
        ("memtouch:wss=256M,rate=50000", "memtouch", {"wss": "256M", "rate": "50000"}),
        ("memtouch:rate=0", "memtouch", {"rate": "0"}),
        ("memtouch:wss=1G", "memtouch", {"wss": "1G"}),
        ("memtouch:wss=4096", "memtouch", {"wss": "4096"}),
        ("diskwrite", "diskwrite", {}),
        ("diskwrite:dev=/dev/vdb", "diskwrite", {"dev": "/dev/vdb"}),
        (
            "diskwrite:dev=/dev/vda,rate=0,size=8K",
            "diskwrite",
            {"dev": "/dev/vda", "rate": "0", "size": "8K"},
        ),
        ("idle", "idle", {}),
        (" idle ", "idle", {}),
    ],
)
def test_parse_workload_good(text: str, kind: str, params: dict[str, str]) -> None:
    w = parse_workload(text)
    assert w.kind == kind
    assert w.params == params


@pytest.mark.parametrize(
    "text",
    [
        "",
        "memtuoch",
        "MEMTOUCH",
        "memtouch:",
        "memtouch:wss",
        "memtouch:wss=",
        "memtouch:=64M",
        "memtouch:wss=64X",
        "memtouch:wss=-1M",
        "memtouch:wss=1K",
        "memtouch:wss=2048G",
        "memtouch:rate=fast",
        "memtouch:rate=-5",
        "memtouch:rate=1.5",
        "memtouch:rate=10K",
        "memtouch:wss=64M,wss=32M",
        "memtouch:wss=64M,,rate=1",
        "memtouch:size=4096",
        "memtouch:wss=64M rate=1",
        "diskwrite:dev=vdb",
        "diskwrite:dev=/dev/../etc/passwd",
        "diskwrite:dev=/dev/vd b",
        "diskwrite:size=100",
        "diskwrite:size=0",
        "diskwrite:size=2M",
        "diskwrite:rate=x",
        "diskwrite:wss=64M",
        "idle:rate=1",
        "idle:",
    ],
)
def test_parse_workload_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_workload(text)


def test_workload_constructor_validates() -> None:
    with pytest.raises(SpecError):
        Workload("memtouch", {"bogus": "1"})
    with pytest.raises(SpecError):
        Workload("sleep")  # type: ignore[arg-type]
    assert Workload("idle").params == {}


def test_workload_text_round_trip() -> None:
    for text in [
        "idle",
        "memtouch",
        "memtouch:wss=64M,rate=5000",
        "diskwrite:size=512,dev=/dev/vdc",
    ]:
        w = parse_workload(text)
        assert str(w) == text
        assert parse_workload(str(w)) == w


def test_effective_params_fill_defaults() -> None:
    w = parse_workload("memtouch:rate=7")
    assert w.effective_params() == {"wss": WORKLOAD_DEFAULTS["memtouch"]["wss"], "rate": "7"}
    assert parse_workload("diskwrite").effective_params()["dev"] == "/dev/vdb"


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("idle", ["idle"]),
        ("memtouch:wss=64M,rate=5000", ["memtouch"]),
        (
            "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50"
            "+diskwrite:dev=/dev/vdb,rate=20",
            ["memtouch", "diskwrite", "diskwrite"],
        ),
        ("diskwrite+diskwrite:dev=/dev/vdc", ["diskwrite", "diskwrite"]),
        ("diskwrite:dev=/dev/vda+memtouch", ["diskwrite", "memtouch"]),
        (" memtouch + diskwrite ", ["memtouch", "diskwrite"]),
        (
            "memtouch+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb+diskwrite:dev=/dev/vdc",
            ["memtouch", "diskwrite", "diskwrite", "diskwrite"],
        ),
    ],
)
def test_parse_workloads_good(text: str, kinds: list[str]) -> None:
    ws = parse_workloads(text)
    assert isinstance(ws, tuple)
    assert [w.kind for w in ws] == kinds
    assert ws == tuple(parse_workload(part) for part in text.split("+"))


def test_parse_workloads_keeps_params_and_round_trips() -> None:
    text = "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb"
    ws = parse_workloads(text)
    assert ws[0].params == {"wss": "64M", "rate": "5000"}
    assert ws[1].params == {"dev": "/dev/vda", "rate": "50"}
    assert ws[2].effective_params() == {"dev": "/dev/vdb", "rate": "50", "size": "4096"}
    assert format_workloads(ws) == text
    assert parse_workloads(format_workloads(ws)) == ws
    assert format_workloads(ws[0]) == "memtouch:wss=64M,rate=5000"
    assert format_workloads([parse_workload("idle")]) == "idle"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "+",
        "memtouch+",
        "+memtouch",
        "memtouch++diskwrite",
        "memtouch+ +diskwrite",
        # more than four
        "memtouch+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb+diskwrite:dev=/dev/vdc"
        "+diskwrite:dev=/dev/vdd",
        "idle+idle+idle+idle+idle",
        # two memtouch
        "memtouch+memtouch",
        "memtouch:wss=16M+diskwrite+memtouch:wss=32M",
        # two diskwrite on one device (the default dev counts)
        "diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vda",
        "diskwrite+diskwrite",
        "diskwrite+diskwrite:dev=/dev/vdb",
        "diskwrite:dev=/dev/vdb,rate=1+memtouch+diskwrite:rate=2",
        # idle runs nothing: joining it is a mistake
        "idle+memtouch",
        "diskwrite+idle",
        # a bad part
        "memtouch+diskwrite:dev=vdb",
        "memtouch:wss=lots+diskwrite",
        "memtouch+sleep",
        "memtouch+diskwrite:",
    ],
)
def test_parse_workloads_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_workloads(text)


def test_parse_workload_takes_one_only() -> None:
    with pytest.raises(SpecError):
        parse_workload("memtouch+diskwrite")


def test_format_workloads_checks_the_combination() -> None:
    with pytest.raises(SpecError):
        format_workloads([])
    with pytest.raises(SpecError):
        format_workloads([Workload("memtouch"), Workload("memtouch")])
    with pytest.raises(SpecError):
        format_workloads([Workload("diskwrite"), Workload("diskwrite", {"dev": "/dev/vdb"})])
    with pytest.raises(SpecError):
        format_workloads([Workload("idle")] * 5)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20), ("1G", 1 << 30)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1T", "1.5G", "-1", " 1M", "1MB"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text)


def _cmdline_args(cmdline: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in cmdline.split():
        key, _eq, value = token.partition("=")
        out[key] = value
    return out


def test_kernel_cmdline_round_trip() -> None:
    w = parse_workload("memtouch:wss=64M,rate=5000")
    line = kernel_cmdline(ip="10.242.1.100/24", gateway="10.242.1.1", workload=w, extra="quiet")
    assert line.startswith("console=ttyS0 panic=-1 pti=on ")
    assert line.endswith(" quiet")
    args = _cmdline_args(line)
    assert args["vmigrate.ip"] == "10.242.1.100/24"
    assert args["vmigrate.gw"] == "10.242.1.1"
    assert parse_workload(args["vmigrate.workload"]) == w
    assert len(line.split()) == 7


def test_kernel_cmdline_minimal() -> None:
    assert kernel_cmdline() == "console=ttyS0 panic=-1 pti=on"
    line = kernel_cmdline(workload=parse_workload("idle"))
    assert line == "console=ttyS0 panic=-1 pti=on vmigrate.workload=idle"


def test_kernel_cmdline_several_workloads() -> None:
    text = "memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb"
    ws = parse_workloads(text)
    line = kernel_cmdline(ip="10.242.1.100/24", workload=ws)
    args = _cmdline_args(line)
    assert args["vmigrate.workload"] == text
    assert parse_workloads(args["vmigrate.workload"]) == ws
    assert len(line.split()) == 5  # one token: the kernel splits its command line on spaces
    assert kernel_cmdline(workload=list(ws)) == kernel_cmdline(workload=ws)
    single = parse_workload("diskwrite:dev=/dev/vda")
    assert kernel_cmdline(workload=(single,)) == kernel_cmdline(workload=single)


def test_kernel_cmdline_refuses_workloads_that_cannot_run_together() -> None:
    with pytest.raises(SpecError):
        kernel_cmdline(workload=(Workload("memtouch"), Workload("memtouch")))
    with pytest.raises(SpecError):
        kernel_cmdline(workload=())


@pytest.mark.parametrize(
    ("ip", "gateway"),
    [
        ("10.0.0.1", None),
        ("10.0.0.300/24", None),
        ("10.0.0.1/33", None),
        ("host/24", None),
        (None, "10.0.0.1/24"),
        (None, "gateway"),
    ],
)
def test_kernel_cmdline_bad_addresses(ip: str | None, gateway: str | None) -> None:
    with pytest.raises(SpecError):
        kernel_cmdline(ip=ip, gateway=gateway)
