"""CPU models and machine types (vmigrate.qemu.cpu), on what QEMU 7.2 said on this
project's machine: under TCG, and under its nested KVM (an AMD EPYC whose KVM offers no
SSE3 and beyond: a real older host). The captures are in
``src/vmigrate/testing/fakehv/captured/`` (``tests/unit/data/capture_qemu.py`` makes
them); the fake hypervisor answers from them through the real parsers.

Covered: parsing QEMU's answers (and refusing what QEMU never sends), ``--cpu`` syntax
and the baselines, pinning a VM's machine type and CPU model at definition (through
the real probe code against a fake QEMU binary), the comparison ``begin`` makes, and
the engine refusing (exit 2, nothing started) or warning, through the fake cluster.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmigrate.audit.log import AuditLog
from vmigrate.config import HostConfig, Inventory, parse_inventory
from vmigrate.drivers.qemu import QemuMonitor
from vmigrate.errors import ConfigError, QemuError, SpecError
from vmigrate.hosts import Host, LocalHost
from vmigrate.migration.job import Timing
from vmigrate.qemu.argv import cpu_option
from vmigrate.qemu.cpu import (
    BASELINES,
    DEFAULT_CPU,
    QemuOffer,
    check_cpu,
    check_machine,
    cpu_requests,
    effective_cpu,
    make_offer,
    parse_cpu,
    parse_cpu_definitions,
    parse_expansion,
    parse_machine_help,
    parse_machines,
    pin_cpu,
    pin_machine,
    unavailable,
)
from vmigrate.qemu.probe import parse_transcript, probe_input
from vmigrate.qemu.spec import CpuSpec, DiskSpec, VMSpec
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.vms import pin_hardware
from vmigrate.store import Store
from vmigrate.testing.fakehv import FakeCluster, FakeQemu, captured_qemu
from vmigrate.testing.fakeqmp import Error, FakeQmpServer

TCG = captured_qemu("tcg")
KVM = captured_qemu("kvm")  # the nested EPYC: no pni (SSE3), ssse3, sse4.x, popcnt, aes
V2AES = parse_cpu(DEFAULT_CPU)


def offer(q: FakeQemu, *cpus: CpuSpec | None) -> QemuOffer:
    return q.offer(cpu_requests(*cpus))


# -- QEMU's own answers ---------------------------------------------------------------------


@pytest.mark.parametrize("q", [TCG, KVM], ids=["tcg", "kvm"])
def test_machine_help_and_query_machines_agree(q: FakeQemu) -> None:
    """``-machine help`` (text) and ``query-machines`` (QMP) of the same binary give
    the same machine types and the same aliases."""
    text = {(m.name, m.alias) for m in parse_machine_help(q.data["machine_help"])}
    qmp = {(m.name, m.alias) for m in parse_machines(q.data["query-machines"])}
    assert text == qmp - {("none", None)} | ({("none", None)} & text)
    assert ("pc-i440fx-7.2", "pc") in qmp and ("pc-q35-7.2", "q35") in qmp


def test_aliases_resolve_to_this_qemus_newest() -> None:
    o = offer(TCG)
    assert o.version[:2] == (7, 2)
    assert o.resolve_machine("pc") == "pc-i440fx-7.2"
    assert o.resolve_machine("q35") == "pc-q35-7.2"
    assert o.resolve_machine("pc-i440fx-6.2") == "pc-i440fx-6.2"
    assert o.resolve_machine("pc-i440fx-9.9") is None
    # an older QEMU (7.1): its pc is its own newest
    old = offer(TCG.without_machines("pc-i440fx-7.2", "pc-q35-7.2"))
    assert old.resolve_machine("pc") == "pc-i440fx-7.1"
    assert old.resolve_machine("q35") == "pc-q35-7.1"
    assert old.resolve_machine("pc-i440fx-7.2") is None


def test_qemu_72_has_no_x86_64_v2_models_so_the_baselines_are_ours() -> None:
    """The baselines are vmigrate's (qemu64 plus features), because QEMU 7.2 has none."""
    names = {c["name"] for c in TCG.data["query-cpu-definitions"]}
    assert not {n for n in names if n.startswith("x86-64")}
    assert all(model in names for model, _flags in BASELINES.values())
    assert TCG.expand(CpuSpec(model="x86-64-v2-AES"))["error"]["desc"] == (
        "CPU model 'x86-64-v2-AES' not found")


@pytest.mark.parametrize("q", [TCG, KVM], ids=["tcg", "kvm"])
def test_what_a_host_lacks_agrees_with_qemu(q: FakeQemu) -> None:
    """For every captured model, the features :func:`unavailable` finds are QEMU's own
    ``unavailable-features``; for a baseline's added features, what ``max`` lacks."""
    models = [m for m, e in q.data["expansions"].items() if "error" not in e]
    cpus = [CpuSpec(model=m) for m in models]
    o = offer(q, *cpus)
    for cpu in cpus:
        said = o.definition(cpu.model)
        assert said is not None
        assert set(unavailable(cpu, o)) == set(said.unavailable), cpu.model
    top = o.expansion(CpuSpec(model="max"))
    assert not isinstance(top, str)
    o = offer(q, V2AES)
    added = {f[1:] for f in V2AES.features if f[0] == "+"}
    assert set(unavailable(V2AES, o)) == added - top.features


def test_the_default_baseline_runs_under_tcg_and_not_on_the_nested_kvm() -> None:
    assert unavailable(V2AES, offer(TCG, V2AES)) == ()
    lacks = unavailable(V2AES, offer(KVM, V2AES))
    assert {"pni", "ssse3", "sse4.1", "sse4.2", "popcnt", "aes"} == set(lacks)
    # the host model under TCG: QEMU says it needs KVM
    assert unavailable(CpuSpec(model="host"), offer(TCG, CpuSpec(model="host"))) == ("kvm",)


def test_a_cpu_limit_bounds_what_a_host_offers() -> None:
    conroe, nehalem = parse_cpu("Conroe"), parse_cpu("Nehalem")
    o = offer(TCG, V2AES, conroe, nehalem)
    beyond_nehalem = set(unavailable(V2AES, o, limit=nehalem))
    beyond_conroe = set(unavailable(V2AES, o, limit=conroe))
    assert beyond_nehalem == {"aes"}
    assert {"aes", "popcnt", "sse4.1", "sse4.2"} <= beyond_conroe
    assert beyond_nehalem < beyond_conroe


# -- parsing what QEMU never sends ----------------------------------------------------------


@pytest.mark.parametrize("reply", [None, 3, "x", [1], [{"name": 1}], [{"alias": "pc"}],
                                   [{"name": ""}]])
def test_malformed_machine_lists_are_qemu_errors(reply: object) -> None:
    with pytest.raises(QemuError):
        parse_machines(reply)


@pytest.mark.parametrize("reply", [{}, [{"name": "x", "unavailable-features": "aes"}],
                                   [{"name": "x", "unavailable-features": [1]}]])
def test_malformed_cpu_lists_are_qemu_errors(reply: object) -> None:
    with pytest.raises(QemuError):
        parse_cpu_definitions(reply)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12))
def test_any_reply_gives_an_offer_or_a_qemu_error(reply: Any) -> None:
    """Nothing but :class:`QemuError` comes out of the parsers, whatever the reply."""
    for parse in (parse_machines, parse_cpu_definitions, parse_expansion):
        with contextlib.suppress(QemuError):
            parse(reply)
    with contextlib.suppress(QemuError):
        make_offer(version=reply, accel="tcg", machines=reply, cpus=reply,
                   expansions={"max": reply} if isinstance(reply, dict) else {})


def test_a_probe_transcript_that_is_not_qmp_is_refused() -> None:
    with pytest.raises(QemuError):
        parse_transcript('{"QMP": {}}\nqemu-system-x86_64: oops\n')
    assert parse_transcript('{"QMP": {}}\n{"return": {}, "id": "a"}\n\n') == {
        "a": {"return": {}, "id": "a"}}


# -- --cpu ----------------------------------------------------------------------------------


def test_cpu_syntax_and_baselines() -> None:
    assert V2AES.model == "qemu64" and V2AES.name == DEFAULT_CPU
    assert {"+aes", "+sse4.2", "-svm"} <= set(V2AES.features)
    cpu = parse_cpu("Nehalem,+aes,x2apic=off,avx=on")
    assert (cpu.model, cpu.features, cpu.name) == ("Nehalem", ("+aes", "-x2apic", "+avx"), None)
    # the last word on a feature wins; a baseline's features can be switched off
    assert parse_cpu("x86-64-v2-AES,-aes").features.count("-aes") == 1
    assert "+aes" not in parse_cpu("x86-64-v2-AES,-aes").features
    # QEMU's spellings of one feature are one feature
    assert parse_cpu("x86-64-v2,-sse4_2").features.count("+sse4.2") == 0
    assert "-sse4_2" in parse_cpu("x86-64-v2,-sse4_2").features


@pytest.mark.parametrize("text", ["", ",aes", "qemu64,aes", "qemu64,+", "qemu64,+a,b",
                                  "qemu64,aes=maybe", "qemu64;touch x", "qemu64,+aes;id",
                                  "host,+aes", "max,-svm", "qemu64,+AES", "a" * 70,
                                  "qemu64,+$(id)", "q\nemu64", "qemu64,,+aes"])
def test_bad_cpu_requests_are_spec_errors(text: str) -> None:
    with pytest.raises(SpecError):
        parse_cpu(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_cpu_text_is_a_spec_or_a_spec_error(text: str) -> None:
    """Whatever the text: a :class:`SpecError`, or a CPU whose ``-cpu`` value has one
    word per model and feature (no comma or '=' can come from the text itself)."""
    try:
        cpu = parse_cpu(text)
    except SpecError:
        return
    value = cpu_option(VMSpec(name="vm", memory_mib=64, cpu=cpu), "tcg")
    words = value.split(",")
    assert words[0] == cpu.model and len(words) == 1 + len(cpu.features)
    assert all(w.count("=") == 1 for w in words[1:])


def test_cpu_option_and_the_older_specs() -> None:
    spec = VMSpec(name="vm", memory_mib=64, cpu=pin_cpu(V2AES, offer(TCG, V2AES), "h1"))
    assert cpu_option(spec, "tcg").startswith("qemu64-v1,aes=on,")
    assert cpu_option(spec, "tcg").endswith(",svm=off")
    legacy = VMSpec(name="vm", memory_mib=64)  # defined before CPU models
    assert (cpu_option(legacy, "kvm"), cpu_option(legacy, "tcg")) == ("host", "qemu64")
    assert effective_cpu(None, "kvm") == CpuSpec(model="host")
    # a stored spec from before still reads
    assert VMSpec.model_validate_json(json.dumps({"name": "vm", "memory_mib": 64})).cpu is None


def test_pinning_resolves_aliases_and_feature_names() -> None:
    o = offer(TCG, parse_cpu("qemu64,+sse4_2"))
    pinned = pin_cpu(parse_cpu("qemu64,+sse4_2"), o, "h1")
    assert pinned == CpuSpec(model="qemu64-v1", features=("+sse4.2",), name="qemu64")
    assert pin_machine("q35", o, "h1") == "pc-q35-7.2"
    with pytest.raises(SpecError):
        pin_machine("pc-i440fx-9.9", o, "h1")
    with pytest.raises(SpecError):
        pin_cpu(CpuSpec(model="Nehalem-v9"), o, "h1")
    with pytest.raises(SpecError):
        pin_cpu(CpuSpec(model="qemu64", features=("+warp-drive",)), o, "h1")


# -- defining a VM: the real probe against a fake QEMU binary ----------------------------------


class ProbedHost(Host):
    """A host whose ``qemu-system-x86_64`` is a :class:`FakeQemu`: it answers the probe's
    stdin on stdout as QEMU does (greeting, replies by id, the quit's SHUTDOWN event).
    Nothing else runs on it."""

    def __init__(self, qemu: FakeQemu) -> None:
        super().__init__("fake")
        self.qemu = qemu
        self.argvs: list[list[str]] = []

    async def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
                    ) -> tuple[int, bytes, bytes]:
        self.argvs.append(list(argv))
        assert argv[1:3] == ["-machine", f"none,accel={self.qemu.accel}"], argv
        lines = [json.dumps({"QMP": {"version": self.qemu.data["query-version"]}})]
        for raw in (stdin or b"").decode().splitlines():
            cmd = json.loads(raw)
            qid, name = cmd["id"], cmd["execute"]
            if name == "query-cpu-model-expansion":
                model = cmd["arguments"]["model"]
                cpu = CpuSpec(model=model["name"], features=tuple(
                    ("+" if on else "-") + f for f, on in model.get("props", {}).items()))
                reply = self.qemu.expand(cpu)
            elif name in ("query-version", "query-machines", "query-cpu-definitions"):
                reply = self.qemu.replies([])[{"query-version": "version",
                                               "query-machines": "machines",
                                               "query-cpu-definitions": "cpus"}[name]]
            else:
                reply = {"return": {}}
            lines.append(json.dumps({**reply, "id": qid}))
            if name == "quit":
                lines.append(json.dumps({"event": "SHUTDOWN", "data": {}}))
        return 0, ("\n".join(lines) + "\n").encode(), b""

    def unix_socket(self, remote_path: str) -> Any:
        raise NotImplementedError

    async def put_file(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    async def get_file(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    async def spawn(self, argv: Sequence[str]) -> Any:
        raise NotImplementedError


def host_cfg(name: str = "h1", **kw: Any) -> HostConfig:
    base: dict[str, Any] = {"name": name, "address": "10.240.1.11",
                            "data_dir": Path("/var/lib/vmigrate"), "accel": "tcg",
                            "migration_address": "10.241.1.11" if name == "h1"
                            else "10.241.1.12"}
    return HostConfig(**{**base, **kw})


async def test_a_vm_is_defined_with_its_hardware_pinned() -> None:
    host = ProbedHost(TCG)
    spec = VMSpec(name="vm", memory_mib=64, machine="pc", cpu=V2AES)
    pinned = await pin_hardware(spec, host, host_cfg())
    assert pinned.machine == "pc-i440fx-7.2"
    assert pinned.cpu is not None and pinned.cpu.model == "qemu64-v1"
    assert pinned.cpu.name == DEFAULT_CPU and pinned.cpu.features == V2AES.features
    assert host.argvs[0][0] == "qemu-system-x86_64" and "stdio" in host.argvs[0]
    # the probe's input names every CPU asked, and max
    assert b'"name": "max"' in probe_input(cpu_requests(V2AES))


async def test_a_host_that_cannot_give_the_model_refuses_the_definition() -> None:
    with pytest.raises(SpecError) as err:
        await pin_hardware(VMSpec(name="vm", memory_mib=64, cpu=V2AES), ProbedHost(KVM),
                           host_cfg(accel="kvm"))
    assert all(f in str(err.value) for f in ("aes", "popcnt", "sse4.2"))
    # within a cpu_limit: Nehalem has no aes
    with pytest.raises(SpecError) as err:
        await pin_hardware(VMSpec(name="vm", memory_mib=64, cpu=V2AES), ProbedHost(TCG),
                           host_cfg(cpu_limit="Nehalem"))
    assert "aes" in str(err.value)
    nehalem = await pin_hardware(VMSpec(name="vm", memory_mib=64, cpu=parse_cpu("Nehalem")),
                                 ProbedHost(TCG), host_cfg(cpu_limit="Nehalem"))
    assert nehalem.cpu == CpuSpec(model="Nehalem-v1", name="Nehalem")


async def test_host_only_where_the_inventory_declares_hosts_identical() -> None:
    host_cpu = VMSpec(name="vm", memory_mib=64, cpu=CpuSpec(model="host"))
    with pytest.raises(SpecError):  # no cpu_group
        await pin_hardware(host_cpu, ProbedHost(KVM), host_cfg(accel="kvm"))
    got = await pin_hardware(host_cpu, ProbedHost(KVM), host_cfg(accel="kvm", cpu_group="r1"))
    assert got.cpu == CpuSpec(model="host")
    with pytest.raises(SpecError):  # and never under TCG: QEMU says host needs KVM
        await pin_hardware(host_cpu, ProbedHost(TCG), host_cfg(cpu_group="r1"))


async def test_an_unknown_machine_type_refuses_the_definition() -> None:
    with pytest.raises(SpecError):
        await pin_hardware(VMSpec(name="vm", memory_mib=64, machine="pc-i440fx-7.2",
                                  cpu=V2AES), ProbedHost(TCG.without_machines("pc-i440fx-7.2")),
                           host_cfg())


def test_inventory_fields() -> None:
    inv = parse_inventory('[defaults]\ncpu = "x86-64-v3"\n[hosts.h1]\ndata_dir = "/v"\n'
                          'cpu_group = "rack-1"\ncpu_limit = "Nehalem"\nvm_cpu = "qemu64,+aes"\n')
    assert inv.defaults.cpu == "x86-64-v3" and inv.hosts["h1"].cpu_limit == "Nehalem"
    for bad in ('cpu_group = "a b"', 'cpu_limit = "x;id"', 'vm_cpu = "qemu64,+$(id)"'):
        with pytest.raises(ConfigError):
            parse_inventory(f'[hosts.h1]\ndata_dir = "/v"\n{bad}\n')


async def test_the_qemu_driver_asks_a_running_vm_over_qmp(tmp_path: Path) -> None:
    """The real monitor: the machine type from the machine object's QOM type, the offer
    from the same queries the probe makes; an expansion QEMU refuses is kept as its
    reason, and the accelerator comes from query-kvm."""
    sock = str(tmp_path / "qmp.sock")
    replies: dict[str, Any] = {
        "qom-get": "pc-i440fx-7.1-machine", "query-kvm": {"enabled": False, "present": True},
        "query-version": TCG.data["query-version"],
        "query-machines": TCG.data["query-machines"],
        "query-cpu-definitions": TCG.data["query-cpu-definitions"],
        "query-cpu-model-expansion": Error("GenericError", "CPU model 'Nehalem-v9' not found"),
    }
    async with FakeQmpServer(sock, replies) as server:
        mon = QemuMonitor(LocalHost("ctl"), sock, "vm")
        try:
            assert await mon.machine_type() == "pc-i440fx-7.1"
            got = await mon.qemu_offer(cpu_requests(CpuSpec(model="Nehalem-v9")))
        finally:
            await mon.close()
    assert got.accel == "tcg" and got.resolve_machine("pc") == "pc-i440fx-7.2"
    assert "not found" in str(got.expansion(CpuSpec(model="Nehalem-v9")))
    asked = [m for m in server.received if m.get("execute") == "query-cpu-model-expansion"]
    assert [m["arguments"]["model"]["name"] for m in asked] == ["max", "Nehalem-v9"]
    assert all(m["arguments"]["type"] == "static" for m in asked)


# -- begin's comparison ----------------------------------------------------------------------


def test_same_hosts_pass_and_an_older_cpu_is_named() -> None:
    conroe = parse_cpu("Conroe")
    same = check_cpu(V2AES, offer(TCG, V2AES), offer(TCG, V2AES, conroe), dst_name="h2")
    assert same.ok
    older = check_cpu(V2AES, offer(TCG, V2AES), offer(TCG, V2AES, conroe), dst_name="h2",
                      dst_limit=conroe)
    assert not older.ok and {"aes", "popcnt", "sse4.2"} <= set(older.missing)
    assert "aes" in older.explain("h1", "h2")
    lacking = check_cpu(V2AES, offer(TCG, V2AES), offer(TCG.lacking("aes"), V2AES),
                        dst_name="h2")
    assert lacking.missing == ("aes",)
    # a guest that never had a feature (its source lacked it) does not need it there
    assert check_cpu(V2AES, offer(TCG.lacking("aes"), V2AES), offer(TCG.lacking("aes"),
                                                                    V2AES), dst_name="h2").ok


def test_the_nested_kvm_host_cannot_take_a_tcg_guest() -> None:
    verdict = check_cpu(V2AES, offer(TCG, V2AES), offer(KVM, V2AES), dst_name="h2")
    assert {"pni", "ssse3", "sse4.1", "sse4.2", "popcnt", "aes"} <= set(verdict.missing)


def test_host_and_unknown_models() -> None:
    h = CpuSpec(model="host")
    assert not check_cpu(h, offer(KVM, h), offer(KVM, h), dst_name="h2").ok
    assert check_cpu(h, offer(KVM, h), offer(KVM, h), dst_name="h2", identical=True).ok
    # an older vmigrate VM (no model: host under KVM) is judged by its features only
    assert check_cpu(h, offer(KVM, h), offer(KVM, h), dst_name="h2", explicit=False).ok
    odd = CpuSpec(model="Skylake-Client-v4")
    gone = check_cpu(odd, offer(TCG, odd), QemuOffer(
        version=(7, 1, 0), accel="tcg", machines=(), cpus=(), known_features=frozenset(),
        expansions={"Skylake-Client-v4": "CPU model 'Skylake-Client-v4' not found"}),
        dst_name="h2")
    assert not gone.ok and gone.problems


def test_a_destination_without_the_machine_type() -> None:
    assert check_machine("pc-i440fx-7.2", offer(TCG), "h2") is None
    why = check_machine("pc-i440fx-7.2", offer(TCG.without_machines("pc-i440fx-7.2")), "h2")
    assert why is not None and "pc-i440fx-7.2" in why and "pc-i440fx-7.1" in why


# -- through the engine, on the fake cluster ------------------------------------------------

FAST = Timing(sample_s=0, poll_s=0, forward_retry_s=0, mirror_sample_s=0, round_pause_s=0,
              cancel_grace_s=0.05, cancel_wait_s=2, dest_run_wait_s=2, boot_wait_s=1,
              ping_wait_s=0.1, memcheck_wait_s=0.1, handover_timeout_s=5)
SHARED, LOCAL = "/srv/shared", "/var/lib/vmigrate/images"




class Fleet:
    """Two TCG hosts of the fake cluster, one VM on h1, a store and the service."""

    def __init__(self, tmp: Path, *, mode: str, cpu: CpuSpec | None, machine: str,
                 h2: dict[str, Any] | None = None, h1_qemu: FakeQemu | None = None) -> None:
        pools = {"local": Path(LOCAL), "shared": Path(SHARED)}
        self.inventory = Inventory(hosts={"h1": host_cfg("h1", pools=pools),
                                          "h2": host_cfg("h2", pools=pools, **(h2 or {}))})
        self.cluster = FakeCluster(self.inventory)
        self.store = Store(tmp / "vmigrate.db")
        self.audit = AuditLog(tmp / "audit.jsonl")
        self.mode = mode
        disk = f"{SHARED}/vm.raw" if mode == "live" else f"{LOCAL}/vm.raw"
        self.spec = VMSpec(name="vm", memory_mib=64, machine=machine, cpu=cpu,
                           disks=(DiskSpec(path=disk),))
        self.store.add_vm("vm", "h1", self.spec.model_dump_json())
        if h1_qemu is not None:
            self.cluster.host("h1").qemu = h1_qemu
        self.cluster.add_vm("h1", self.spec, ram=64 << 20)

    async def migrate(self) -> Any:
        svc = MigrationService(self.inventory, self.store, self.audit,
                               backend=self.cluster.backend(), timing=FAST)
        return await svc.migrate(MigrationRequest(vm="vm", dest="h2", mode=self.mode,
                                                  shutdown_timeout=0.5))

    def started_on(self, host: str) -> list[str]:
        return [c.method for c in self.cluster.calls
                if c.host == host and c.method == "start_vm"]


PINNED = CpuSpec(model="qemu64-v1", features=V2AES.features, name=DEFAULT_CPU)


@pytest.mark.parametrize("mode", ["live", "online"])
async def test_live_refuses_a_destination_without_the_machine_type(tmp_path: Path,
                                                                    mode: str) -> None:
    f = Fleet(tmp_path, mode=mode, cpu=PINNED, machine="pc-i440fx-7.2")
    f.cluster.host("h2").qemu = TCG.without_machines("pc-i440fx-7.2")
    report = await f.migrate()
    assert report.status == "failed" and report.exit_status == 2, report.error
    assert report.phase == "begin" and "pc-i440fx-7.2" in (report.error or "")
    assert f.started_on("h2") == [] and not f.cluster.host("h2").vms
    assert f.cluster.find("vm", "h1").run_state == "running"
    assert f.store.get_vm("vm").host == "h1"


@pytest.mark.parametrize("mode", ["live", "online"])
async def test_live_refuses_a_destination_restricted_to_an_older_cpu(tmp_path: Path,
                                                                    mode: str) -> None:
    f = Fleet(tmp_path, mode=mode, cpu=PINNED, machine="pc-i440fx-7.2",
              h2={"cpu_limit": "Conroe"})
    report = await f.migrate()
    assert report.status == "failed" and report.exit_status == 2, report.error
    assert all(feat in (report.error or "") for feat in ("aes", "popcnt", "sse4.2"))
    assert f.started_on("h2") == [] and not f.cluster.host("h2").vms
    assert f.cluster.find("vm", "h1").run_state == "running"


async def test_live_goes_ahead_between_like_hosts(tmp_path: Path) -> None:
    f = Fleet(tmp_path, mode="live", cpu=PINNED, machine="pc-i440fx-7.2")
    report = await f.migrate()
    assert report.status == "completed", report.error
    assert f.cluster.find("vm", "h2").machine == "pc-i440fx-7.2"


async def test_an_older_spec_gets_the_machine_type_its_source_runs(tmp_path: Path) -> None:
    """A VM defined with the alias pc before vmigrate pinned machine types, started
    when its host's QEMU was older (pc was pc-i440fx-7.1); the host's QEMU was upgraded
    since. Its destination runs what the source runs, and the store keeps it pinned."""
    f = Fleet(tmp_path, mode="live", cpu=None, machine="pc",
              h1_qemu=TCG.without_machines("pc-i440fx-7.2"))  # started under the older QEMU
    f.cluster.host("h1").qemu = TCG  # then the host's QEMU was upgraded
    assert f.cluster.find("vm", "h1").machine == "pc-i440fx-7.1"
    report = await f.migrate()
    assert report.status == "completed", report.error
    assert f.cluster.find("vm", "h2").machine == "pc-i440fx-7.1"
    assert VMSpec.model_validate_json(f.store.get_vm("vm").spec_json).machine == (
        "pc-i440fx-7.1")
    assert any("no CPU model of its own" in n for n in report.notes)


@pytest.mark.parametrize("mode", ["cold", "warm"])
async def test_cold_and_warm_warn_of_missing_cpu_features(tmp_path: Path, mode: str) -> None:
    f = Fleet(tmp_path, mode=mode, cpu=PINNED, machine="pc-i440fx-7.2",
              h2={"cpu_limit": "Nehalem"})
    report = await f.migrate()
    assert report.status == "completed", report.error
    warnings = [n for n in report.notes if n.startswith("warning:") and "aes" in n]
    assert warnings, report.notes


async def test_cold_refuses_a_destination_without_the_machine_type(tmp_path: Path) -> None:
    """A fresh boot needs the machine type too: refused before any disk is copied."""
    f = Fleet(tmp_path, mode="cold", cpu=PINNED, machine="pc-i440fx-7.2")
    f.cluster.host("h2").qemu = TCG.without_machines("pc-i440fx-7.2")
    report = await f.migrate()
    assert report.status == "failed" and report.exit_status == 2, report.error
    assert not [p for p in f.cluster.host("h2").files if p.startswith(LOCAL)]
