"""Issue 14: ``vmigrate wave plan`` -- the fleet read from the inventory and the store
(vmigrate.service.fleet), planned without contacting a host (measure=False)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from vmigrate.config import parse_inventory
from vmigrate.errors import ConfigError, UserError
from vmigrate.plan.fleet import check_schedule
from vmigrate.qemu.spec import build_spec
from vmigrate.service.fleet import WavePlan, current_fleet, plan_wave, read_plan_file
from vmigrate.store import Store

G = 1 << 30

INVENTORY = """
[hosts.h1]
data_dir = "/var/lib/vmigrate"
memory = "8G"
cpus = 4
[hosts.h2]
data_dir = "/var/lib/vmigrate"
memory = "4G"
cpus = 4
[hosts.h3]
data_dir = "/var/lib/vmigrate"
memory = "4G"
reserve_memory = "1G"
cpus = 4
[links.h1-up]
capacity = "1gbit"
budget = 0.8
[links.h2-down]
capacity = "200mbit"
[links.h3-down]
capacity = "200mbit"
[links.h1-down]
capacity = "1gbit"
[links.h2-up]
capacity = "1gbit"
[links.h3-up]
capacity = "1gbit"
[groups.db]
vms = ["db*"]
placement = "apart"
"""


def _store(tmp_path: Path, vms: dict[str, tuple[str, int]]) -> Store:
    store = Store(tmp_path / "vmigrate.db")
    for name, (host, mib) in vms.items():
        store.add_vm(name, host, build_spec(name=name, memory_mib=mib).model_dump_json())
    return store


def _plan(tmp_path: Path, vms: dict[str, tuple[str, int]], inventory: str = INVENTORY,
          **kw: object) -> WavePlan:
    inv = parse_inventory(inventory)
    store = _store(tmp_path, vms)
    try:
        return asyncio.run(plan_wave(inv, store, measure=False, **kw))  # type: ignore[arg-type]
    finally:
        store.close()


def test_evacuation_spreads_and_keeps_every_rule(tmp_path: Path) -> None:
    vms = {"web1": ("h1", 1024), "web2": ("h1", 1024), "db1": ("h1", 512),
           "db2": ("h1", 512), "other": ("h2", 512)}
    plan = _plan(tmp_path, vms, evacuate="h1")
    moves = {m.vm: m.dst for m in plan.placement.moves}
    assert set(moves) == {"web1", "web2", "db1", "db2"}
    assert set(moves.values()) == {"h2", "h3"}  # spread, not all onto one host
    assert moves["db1"] != moves["db2"]  # the 'apart' group
    assert check_schedule(plan.schedule, plan.view.fleet) == []
    assert plan.schedule.makespan_s > 0
    assert plan.schedule.makespan_s <= plan.baseline("sequential").makespan_s + 1e-6
    assert all(plan.placement.why[vm] for vm in moves)
    assert any("no assessment" in n for n in plan.view.notes)
    data = plan.to_json()
    json.dumps(data)
    assert data["kind"] == "evacuate" and data["host"] == "h1"


def test_a_vm_too_big_for_any_host_is_named(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {"huge": ("h1", 6144), "small": ("h1", 256)}, evacuate="h1")
    assert [m.vm for m in plan.placement.moves] == ["small"]
    assert [vm for vm, _ in plan.placement.unplaceable] == ["huge"]


def test_a_link_of_unknown_capacity_is_refused_by_name(tmp_path: Path) -> None:
    inventory = INVENTORY.replace('[links.h3-down]\ncapacity = "200mbit"\n', "")
    with pytest.raises(ConfigError, match="h3-down"):
        _plan(tmp_path, {"a": ("h1", 256)}, inventory=inventory, evacuate="h1")


def test_plan_file_moves_with_and_without_a_destination(tmp_path: Path) -> None:
    path = tmp_path / "wave.toml"
    path.write_text('[[move]]\nvm = "a"\nto = "h3"\n\n[[move]]\nvm = "b"\n')
    assert read_plan_file(path) == [("a", "h3"), ("b", None)]
    plan = _plan(tmp_path, {"a": ("h1", 256), "b": ("h1", 256), "c": ("h1", 256)},
                 plan_file=path)
    moves = {m.vm: m.dst for m in plan.placement.moves}
    assert moves["a"] == "h3" and moves["b"] in ("h2", "h3") and "c" not in moves


@pytest.mark.parametrize("text", ["", "[[move]]\nto = \"h2\"\n", "[[move]]\nvm = 3\n",
                                  "[[move]]\nvm = \"a;rm -rf /\"\n", "other = 1\n",
                                  "[[move]]\nvm = \"a\"\nwhen = \"now\"\n"])
def test_bad_plan_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "wave.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        read_plan_file(path)


def test_exactly_one_kind_of_wave(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        _plan(tmp_path, {"a": ("h1", 256)})
    with pytest.raises(UserError):
        _plan(tmp_path, {"a": ("h1", 256)}, evacuate="h1", rebalance=True)


def test_rebalance_moves_towards_balance(tmp_path: Path) -> None:
    vms = {f"v{i}": ("h1", 1024) for i in range(5)}
    plan = _plan(tmp_path, vms, rebalance=True, max_moves=3)
    assert 1 <= len(plan.placement.moves) <= 3
    p = plan.placement
    assert p.imbalance_before is not None and p.imbalance_after is not None
    assert p.imbalance_after < p.imbalance_before


def test_a_host_in_maintenance_takes_nothing(tmp_path: Path) -> None:
    inv = parse_inventory(INVENTORY)
    store = _store(tmp_path, {"a": ("h1", 256), "b": ("h1", 256)})
    store.set_host_state("h3", "maintenance", "firmware")
    try:
        view = asyncio.run(current_fleet(inv, store, measure=False))
        assert view.fleet.host("h3").state == "maintenance"
        plan = asyncio.run(plan_wave(inv, store, evacuate="h1", measure=False))
    finally:
        store.close()
    assert {m.dst for m in plan.placement.moves} == {"h2"}


def test_the_cli_prints_json_and_changes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vmigrate.cli._common import CTX
    from vmigrate.cli.main import app

    (tmp_path / "vmigrate.toml").write_text(INVENTORY)
    store = _store(tmp_path, {"a": ("h1", 256), "b": ("h1", 512)})
    store.close()
    before = (tmp_path / "vmigrate.db").read_bytes()
    saved = CTX.config
    try:
        res = CliRunner().invoke(app, ["--config", str(tmp_path / "vmigrate.toml"), "wave",
                                       "plan", "--evacuate", "h1", "--no-measure", "--json"],
                                 env={"VMIGRATE_HOME": str(tmp_path)})
        bad = CliRunner().invoke(app, ["--config", str(tmp_path / "vmigrate.toml"), "wave",
                                       "plan", "--evacuate", "h9", "--no-measure"],
                                 env={"VMIGRATE_HOME": str(tmp_path)})
    finally:
        CTX.config = saved
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dry_run"] is True and len(data["placement"]["moves"]) == 2
    assert data["schedule"]["makespan_s"] > 0 and data["sequential_makespan_s"] > 0
    from vmigrate.errors import VmigrateError

    assert isinstance(bad.exception, VmigrateError) and bad.exception.exit_code == 2
    assert (tmp_path / "vmigrate.db").read_bytes() == before


def test_host_activate_puts_a_host_back_and_audits_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vmigrate.audit import verify
    from vmigrate.cli._common import CTX
    from vmigrate.cli.main import app

    (tmp_path / "vmigrate.toml").write_text(INVENTORY.replace(
        '[hosts.h3]\n', '[hosts.h3]\nstate = "maintenance"\n'))
    saved = CTX.config
    try:
        res = CliRunner().invoke(app, ["--config", str(tmp_path / "vmigrate.toml"), "host",
                                       "activate", "h3", "--reason", "firmware done",
                                       "--json"], env={"VMIGRATE_HOME": str(tmp_path)})
    finally:
        CTX.config = saved
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["was"] == "maintenance"
    store = Store(tmp_path / "vmigrate.db")
    try:
        rec = store.effective_host_state("h3", "maintenance")
    finally:
        store.close()
    assert (rec.state, rec.source, rec.reason) == ("active", "store", "firmware done")
    log = (tmp_path / "audit.jsonl").read_text()
    assert '"host.state"' in log and "firmware done" in log
    assert verify(tmp_path / "audit.jsonl").ok
