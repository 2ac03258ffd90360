"""Issue 14 (fleets): what VMs use on a host (vmigrate.service.capacity). The parsing
is tested on plain text; the host part on a recording host (what argv reaches it) and
once for real on this machine (the constant script against a process of ours)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmigrate.config import HostConfig, Inventory, parse_inventory
from vmigrate.errors import NotFoundError
from vmigrate.hosts import Host, LocalHost
from vmigrate.qemu.spec import build_spec
from vmigrate.service import capacity
from vmigrate.service.capacity import (
    HostSample,
    ProcStat,
    fleet_usage,
    host_usage,
    parse_meminfo,
    parse_proc_stat,
    parse_sample,
    sample_host,
)
from vmigrate.store import Store
from vmigrate.testing.recordhost import Answer, RecordingHost

MiB = 1 << 20
G = 1 << 30

STAT = ("4242 (qemu-system-x86) S 1 4241 4241 0 -1 4194624 51234 0 12 0 "
        "1500 320 0 0 20 0 5 0 123456 2147483648 65536 18446744073709551615 1 1 0 0 0 0 "
        "0 4096 17923 0 0 0 17 1 0 0 0 0 0")

MEMINFO = """MemTotal:       16316412 kB
MemFree:         1234567 kB
MemAvailable:   12000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
garbage line
"""


# -- parsing ---------------------------------------------------------------------------------


def test_parse_proc_stat() -> None:
    stat = parse_proc_stat(STAT)
    assert stat == ProcStat(pid=4242, ticks=1820, rss_pages=65536)


def test_parse_proc_stat_with_spaces_and_parens_in_the_name() -> None:
    line = STAT.replace("(qemu-system-x86)", "(a) b (c d))")
    assert parse_proc_stat(line).ticks == 1820


@pytest.mark.parametrize("line", ["", "4242", "4242 (qemu) S 1 2", "x (q) " + "1 " * 30,
                                  STAT.replace(" 1500 ", " -5 ")])
def test_parse_proc_stat_refuses_what_is_not_one(line: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(line)


def test_parse_meminfo() -> None:
    mem = parse_meminfo(MEMINFO)
    assert mem["MemTotal"] == 16316412 * 1024
    assert mem["MemAvailable"] == 12000000 * 1024
    assert mem["HugePages_Total"] == 0  # no unit: a count
    assert "garbage line" not in mem


def _output(*, first: dict[int, int], second: dict[int, int], t0: float = 100.0,
            t1: float = 101.0, pid: int = 4242) -> str:
    """What the sample script prints: pidfile index (1-based) -> utime."""
    lines = ["clk 100", "page 4096", "nproc 8",
             "mem MemTotal:       16316412 kB", "mem MemAvailable:   12000000 kB",
             f"t0 {t0}"]
    lines += [f"p0 {i} " + STAT.replace("4242", str(pid + i)).replace(" 1500 ", f" {u} ")
              for i, u in first.items()]
    lines.append(f"t1 {t1}")
    lines += [f"p1 {i} " + STAT.replace("4242", str(pid + i)).replace(" 1500 ", f" {u} ")
              for i, u in second.items()]
    return "\n".join(lines) + "\n"


def test_parse_sample_and_cpu_use() -> None:
    sample = parse_sample(_output(first={1: 1000, 2: 500}, second={1: 1150, 2: 500},
                                  t0=100.0, t1=100.5))
    assert (sample.clk_tck, sample.page_size, sample.nproc) == (100, 4096, 8)
    assert sample.mem_total == 16316412 * 1024
    assert sample.elapsed == pytest.approx(0.5)
    assert sample.cpu(0) == pytest.approx(3.0)  # 150 ticks of 1/100 s in 0.5 s
    assert sample.cpu(1) == 0.0
    assert sample.cpu(2) is None and sample.pid(2) is None
    assert sample.rss(0) == 65536 * 4096
    assert sample.pid(0) == 4243


def test_a_process_replaced_between_samples_is_not_measured() -> None:
    text = _output(first={1: 100}, second={}) + "p1 1 " + STAT.replace("4242", "9999") + "\n"
    sample = parse_sample(text)
    assert sample.pid(0) == 9999 and sample.cpu(0) is None


def test_parse_sample_without_samples_or_with_junk() -> None:
    assert parse_sample("") == HostSample()
    assert parse_sample("clk x\nnproc 0\nt0 nope\nhello\n").elapsed is None
    with pytest.raises(ValueError):
        parse_sample("p0 x " + STAT + "\n")
    with pytest.raises(ValueError):
        parse_sample("p0 1 not a stat line\n")


# -- the service on a recording host -----------------------------------------------------------

INVENTORY = """
[hosts.h1]
data_dir = "/var/lib/vmigrate"
reserve_memory = "1G"
state = "draining"
[hosts.h2]
data_dir = "/srv/vm"
memory = "32G"
cpus = 16
"""


class _Hosts:
    """A host source that hands out recording hosts."""

    def __init__(self, inv: Inventory, answer: Answer) -> None:
        self.inv = inv
        self.hosts: dict[str, RecordingHost] = {}
        self.answer = answer

    def get(self, name: str) -> tuple[Host, HostConfig]:
        cfg = self.inv.host(name)
        host = self.hosts.setdefault(name, RecordingHost(name, self.answer))
        return host, cfg


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "db")
    for name, host, mem, cpus in (("a", "h1", 1024, 2), ("b", "h1", 512, 1),
                                  ("c", "h2", 2048, 4), ("d", "h2", 256, 1)):
        spec = build_spec(name=name, memory_mib=mem, vcpus=cpus)
        store.add_vm(name, host, spec.model_dump_json())
    store.create_job("j1", "d", "live", "h2", "h1", {})  # d moves into h1
    return store


def test_host_usage_counts_specs_and_measures_processes(tmp_path: Path) -> None:
    inv = parse_inventory(INVENTORY)
    store = _store(tmp_path)

    def answer(argv: list[str]) -> tuple[int, str, str]:
        # a runs (1.5 CPUs), b is gone, d (incoming) runs
        return 0, _output(first={1: 1000, 3: 10}, second={1: 1150, 3: 20}), ""

    hosts = _Hosts(inv, answer)
    usage = asyncio.run(host_usage(inv, store, "h1", hosts=hosts, interval=0.25))
    [argv] = hosts.hosts["h1"].commands
    assert argv[:2] == ["sh", "-c"] and argv[2] == capacity._SAMPLE_SCRIPT
    assert argv[3:] == ["sh", "0.250", "/var/lib/vmigrate/vms/a/qemu.pid",
                        "/var/lib/vmigrate/vms/b/qemu.pid", "/var/lib/vmigrate/vms/d/qemu.pid"]
    assert [vm.name for vm in usage.vms] == ["a", "b", "d"]
    a, b, d = usage.vms
    assert (a.process, a.cpu, a.memory, a.vcpus, a.incoming) == ("running", 1.5, G, 2, False)
    assert (b.process, b.gone, b.cpu, b.pid) == ("gone", True, None, None)
    assert (d.process, d.incoming, d.cpu) == ("running", True, pytest.approx(0.1))
    assert usage.memory_used == G + 512 * MiB + 256 * MiB
    assert usage.vcpus == 4
    assert usage.cpu_used == pytest.approx(1.5 + 1 + 0.1)  # b counts its vCPU
    assert (usage.memory, usage.memory_source) == (16316412 * 1024, "measured")
    assert (usage.cpus, usage.cpus_source) == (8, "measured")
    assert usage.memory_free == 16316412 * 1024 - G - usage.memory_used
    assert (usage.state.state, usage.state.source) == ("draining", "inventory")
    assert usage.measured and usage.error is None
    data = usage.as_dict()
    assert data["vms"][1]["process"] == "gone" and data["memory_source"] == "measured"


def test_declared_capacity_wins_and_the_store_state_overrides(tmp_path: Path) -> None:
    inv = parse_inventory(INVENTORY)
    store = _store(tmp_path)
    store.set_host_state("h2", "maintenance", "firmware")
    hosts = _Hosts(inv, lambda argv: (0, _output(first={}, second={}), ""))
    usage = asyncio.run(host_usage(inv, store, "h2", hosts=hosts))
    assert (usage.memory, usage.memory_source, usage.cpus, usage.cpus_source) == (
        32 * G, "inventory", 16, "inventory")
    assert usage.mem_total == 16316412 * 1024  # measured all the same
    assert [vm.name for vm in usage.vms] == ["c", "d"]  # d still counts on its source
    assert all(vm.gone for vm in usage.vms)
    assert (usage.state.state, usage.state.source, usage.state.reason) == (
        "maintenance", "store", "firmware")


def test_an_unreachable_host_gives_specs_and_its_error(tmp_path: Path) -> None:
    inv = parse_inventory(INVENTORY)
    store = _store(tmp_path)
    hosts = _Hosts(inv, lambda argv: (255, "", "connection refused"))
    [h1, h2] = asyncio.run(fleet_usage(inv, store, hosts=hosts))
    assert not h1.measured and h1.error and "connection refused" in h1.error
    assert all(vm.process == "unknown" for vm in h1.vms)
    assert h1.cpu_used == 2 + 1 + 1  # every VM at its spec
    assert h1.memory is None and h1.memory_free is None
    assert h2.memory == 32 * G


def test_not_measuring_runs_nothing(tmp_path: Path) -> None:
    inv = parse_inventory(INVENTORY)
    store = _store(tmp_path)
    hosts = _Hosts(inv, lambda argv: (1, "", "must not run"))
    usages = asyncio.run(fleet_usage(inv, store, ["h2"], hosts=hosts, measure=False))
    assert hosts.hosts == {}
    assert [u.host for u in usages] == ["h2"] and not usages[0].measured
    with pytest.raises(NotFoundError):
        asyncio.run(fleet_usage(inv, store, ["h9"], hosts=hosts))
    with pytest.raises(ValueError):
        asyncio.run(host_usage(inv, store, "h1", hosts=hosts, interval=0))


# -- the script, for real on this machine ------------------------------------------------------


def test_the_sample_script_on_this_machine(tmp_path: Path) -> None:
    pidfile = tmp_path / "vms" / "g" / "qemu.pid"
    pidfile.parent.mkdir(parents=True)
    other = tmp_path / "other.pid"
    # a process whose command line names its pidfile, as QEMU's does (-pidfile PATH)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             str(pidfile)])
    try:
        pidfile.write_text(f"{proc.pid}\n")
        other.write_text(f"{proc.pid}\n")  # a PID whose cmdline does not name this file
        sample = asyncio.run(sample_host(LocalHost("local"),
                                         [str(pidfile), str(other), str(tmp_path / "none")],
                                         0.2))
    finally:
        proc.kill()
        proc.wait()
    assert sample.pid(0) == proc.pid
    assert sample.pid(1) is None and sample.pid(2) is None
    cpu = sample.cpu(0)
    assert cpu is not None and 0 <= cpu < 1
    assert sample.elapsed is not None and 0.1 < sample.elapsed < 2
    assert sample.nproc and sample.nproc >= 1
    assert sample.mem_total and sample.mem_total > 64 * MiB


# -- vmigrate host list --------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from vmigrate.cli.main import app
    from vmigrate.errors import VmigrateError

    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, VmigrateError):
        return res.exception.exit_code, str(res.exception)
    return res.exit_code, res.stdout


def test_host_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmigrate.cli._common import CTX

    monkeypatch.setattr(CTX, "config", CTX.config)  # --config sets it: put it back after
    home = tmp_path / "home"
    monkeypatch.setenv("VMIGRATE_HOME", str(home))
    inv = tmp_path / "inv.toml"
    inv.write_text(f"""
[hosts.here]
transport = "local"
data_dir = "{tmp_path}/data"
reserve_memory = "64M"
uplink = "rack1-up"
[hosts.here.labels]
rack = "r1"
[hosts.there]
address = "192.0.2.1"
data_dir = "/var/lib/vmigrate"
memory = "64G"
cpus = 16
[links.rack1-up]
capacity = "1gbit"
budget = 0.25
""")
    store = Store(home / "vmigrate.db")
    store.add_vm("g1", "here", build_spec(name="g1", memory_mib=512, vcpus=2).model_dump_json())
    store.set_host_state("there", "maintenance", "new disks")
    store.close()
    code, out = _cli("--config", str(inv), "host", "list", "--json", "here")
    assert code == 0, out
    [here] = json.loads(out)
    assert here["host"] == "here" and here["measured"] is True
    assert here["memory_source"] == "measured" and here["memory"] > 0
    assert here["reserve_memory"] == 64 * MiB and here["memory_used"] == 512 * MiB
    assert [vm["process"] for vm in here["vms"]] == ["gone"]  # no QEMU of it runs
    assert here["labels"] == {"rack": "r1"}
    assert here["uplink"] == {"name": "rack1-up", "capacity": 125_000_000, "budget": 0.25,
                              "migration_rate": 31_250_000.0, "declared": True}
    assert here["downlink"]["name"] == "here-down" and here["downlink"]["capacity"] is None
    code, out = _cli("--config", str(inv), "host", "list", "--no-measure")
    assert code == 0, out
    assert "there: maintenance, set" in out and "new disks" in out  # under the table
    code, _out = _cli("--config", str(inv), "host", "list", "nope")
    assert code == 2
