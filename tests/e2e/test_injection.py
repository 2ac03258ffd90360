"""Injection and bad input on a real lab host (issue 13, items 1 and 8).

The injection strings of the issue, and generated ones, in spec and inventory fields:
refused with exit status 2 and no sentinel file anywhere (the hosts' filesystem, seen
from their namespace, and the controller's). A disk path with a comma, written ``,,``,
reaches QEMU escaped and boots. A destination out of space: exit status 8, the partial
copy kept, and the rerun resumes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_vms import BOOT_MARK, boot_sector_image, qemu_pids, wait_for_console
from vmigrate.config import dump_inventory
from vmigrate.errors import UserError
from vmigrate.lab.image import image_paths
from vmigrate.service.vms import CreateRequest, VmService
from vmigrate.store import Store

pytestmark = pytest.mark.lab

TOKEN = secrets.token_hex(4)
#: an absolute sentinel: any shell that ran an injection would create it, wherever its cwd
SENTINEL = Path(tempfile.gettempdir()) / f"vmig-pwned-{TOKEN}"
#: and a relative one, created in the cwd of whatever ran it (root's home over SSH)
RELATIVE = f"PWNED-{TOKEN}"
INJECT = f"x';touch {SENTINEL};touch {RELATIVE};'"


def _sentinels(lab: Lab) -> list[str]:
    """Every sentinel found: on the controller (cwd, home, the lab), and on each lab host
    as its own namespace sees the filesystem."""
    found = [str(p) for p in (SENTINEL, Path.cwd() / RELATIVE, Path.home() / RELATIVE,
                              lab.home / RELATIVE) if p.exists()]
    assert lab.inventory.lab is not None
    from vmigrate.lab.links import host_netns

    for host in lab.inventory.hosts:
        netns = host_netns(lab.home, host)
        res = subprocess.run(
            ["ip", "netns", "exec", netns, "sh", "-c",
             'for p in "$@"; do [ -e "$p" ] && echo "$p"; done; exit 0', "sh",
             str(SENTINEL), f"{Path.home()}/{RELATIVE}", f"/root/{RELATIVE}"],
            capture_output=True, text=True, check=True)
        found += [f"{host}:{line}" for line in res.stdout.split()]
    return found


@pytest.fixture(scope="module")
def clean(lab: Lab) -> Iterator[Lab]:
    """The lab, checked free of sentinels before and after; they are removed at the end
    even when a test fails (so a failure is seen once, not by every later run)."""
    assert _sentinels(lab) == []
    try:
        yield lab
    finally:
        for p in (SENTINEL, Path.cwd() / RELATIVE, Path.home() / RELATIVE,
                  lab.home / RELATIVE):
            p.unlink(missing_ok=True)


def _refused(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr
    assert lines and (lines[0].startswith("error:") or lines[-1].startswith("Error:"))


CASES = {
    "nic-bridge": ["--nic", INJECT],
    "machine": ["--machine", "pc,memory-backend=evil"],
    "machine-shell": ["--machine", f"pc;touch {SENTINEL}"],
    "nic-model-comma": ["--nic", "brvm,model=e1000,,romfile=/etc/passwd"],
    "nic-model-option": ["--nic", "brvm,model=e1000,romfile=/etc/passwd"],
    "disk-comma": ["--no-nic", "--disk", "/etc/hostname,file.filename=/etc/shadow"],
    "disk-shell": ["--no-nic", "--disk", f"/tmp/x';touch {SENTINEL};'.raw"],
    "kernel-shell": ["--no-nic", "--kernel", f"/boot/$(touch {SENTINEL})"],
}


def test_injection_strings_are_refused(clean: Lab) -> None:
    lab = clean
    for i, (case, extra) in enumerate(CASES.items()):
        res = lab.cli("vm", "create", f"inj{i}", "--host", "h1", "--memory", "64M", *extra)
        _refused(res)
        assert _sentinels(lab) == [], case
    assert lab.cli_json("vm", "list") == []
    assert qemu_pids(lab) == []


def _toml(raw: dict[str, Any]) -> str:
    """An inventory's tables (``[lab]``, ``[hosts.h1]``, ``[hosts.h1.pools]`` ...) as TOML,
    whatever the values hold: JSON strings, lists and numbers are TOML ones."""
    out: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        out.append(f"[{name}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        out.extend(f"{k} = {json.dumps(v)}" for k, v in body.items() if k not in subs)
        for key, sub in subs.items():
            table(f"{name}.{key}", sub)

    for key, body in raw.items():
        table(key, body)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("field", ["vm_bridge", "data_dir", "address", "qemu_binary", "pools"])
def test_hostile_inventory_is_refused(clean: Lab, field: str, tmp_path: Path) -> None:
    lab = clean
    raw = tomllib.loads(dump_inventory(lab.inventory))
    h1 = raw["hosts"]["h1"]
    if field == "pools":
        h1["pools"]["evil"] = f"{h1['data_dir']}/`touch {SENTINEL}`"
    else:
        h1[field] = {"vm_bridge": INJECT, "data_dir": f"{h1['data_dir']}/x$(touch {SENTINEL})",
                     "address": f"{h1['address']};touch {SENTINEL}",
                     "qemu_binary": f"qemu-system-x86_64;touch {SENTINEL}"}[field]
    path = tmp_path / "vmigrate.toml"
    path.write_text(_toml(raw))
    for args in (["vm", "create", "invinj", "--host", "h1", "--memory", "64M"],
                 ["vm", "list"], ["copy-disk", "/etc/hostname", "h1:/tmp/x.raw"]):
        _refused(lab.cli("--config", str(path), *args))
    assert _sentinels(lab) == []


def _generated(rng: random.Random, n: int) -> list[str]:
    parts = ["'", '"', ";", "$(", ")", "`", "\n", ",", ",,", "=", " ", "|", "&", ">", "*", "..",
             "/", "-", "é", f"touch {SENTINEL}", f"touch {RELATIVE}", "br", "vm", "e1000",
             "/tmp/", "pc", ",model=", ",memory-backend=x"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def test_generated_values_on_a_real_host(clean: Lab, tmp_path: Path) -> None:
    """Generated hostile values in every field of a create request, through the service
    and its real SSH host (files and the host's QEMU are checked there): each one is
    refused as a wrong request, or, where it is a legal value, passed as one argv word
    (nothing started: start=False)."""
    lab = clean
    store = Store(tmp_path / "vmigrate.db")
    rng = random.Random(13)
    img = image_paths()
    outcomes: dict[str, int] = {"refused": 0, "accepted": 0}

    async def go() -> None:
        async with VmService(lab.inventory, store) as svc:
            for value in _generated(rng, 12):
                for field in ("name", "nics", "machine", "disks", "kernel", "initrd",
                              "append", "ip", "memory", "workload"):
                    req = CreateRequest(name="gen", host="h1", memory="64M", nic=False,
                                        kernel=str(img.kernel), initrd=str(img.initrd),
                                        start=False)
                    if field in ("nics", "disks"):
                        setattr(req, field, [value])
                    else:
                        setattr(req, field, value)
                    try:
                        await svc.create(req)
                    except UserError:
                        outcomes["refused"] += 1
                        continue
                    outcomes["accepted"] += 1
                    store.remove_vm(req.name)

    asyncio.run(go())
    assert outcomes["refused"] > 0 and outcomes["accepted"] > 0
    assert _sentinels(lab) == []
    assert qemu_pids(lab) == []


def test_disk_path_with_a_comma_boots(clean: Lab) -> None:
    """A comma in a path is legal: written ``,,`` on the command line, escaped once in
    QEMU's option string, and QEMU opens that very file."""
    lab = clean
    shared = lab.inventory.host("h1").pools["shared"]
    shared.mkdir(parents=True, exist_ok=True)
    disk = shared / "boot,comma.raw"
    boot_sector_image(disk)
    res = lab.cli("vm", "create", "comma1", "--host", "h1", "--memory", "64M", "--no-nic",
                  "--disk", f"{str(disk).replace(',', ',,')},format=raw")
    try:
        assert res.returncode == 0, res.stderr
        wait_for_console(lab, "comma1", BOOT_MARK, timeout=60)
        show = lab.cli_json("vm", "show", "comma1")
        assert isinstance(show, dict) and show["spec"]["disks"][0]["path"] == str(disk)
    finally:
        lab.cli("vm", "destroy", "comma1")
        disk.unlink(missing_ok=True)
    assert qemu_pids(lab) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (unmounted at the end, even after a failure)."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "vmig-small", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_destination_out_of_space_keeps_the_partial_copy(clean: Lab, small_fs: Path,
                                                         tmp_path: Path) -> None:
    lab = clean
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(6 << 20))  # incompressible, no zeros: every byte must land
    dst = small_fs / "dst.raw"
    res = lab.cli("copy-disk", str(src), str(dst), "--compress", "off", "--json")
    assert res.returncode == 8, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert not dst.exists()
    kept = sorted(p.name for p in small_fs.iterdir())
    assert any("partial" in name for name in kept), kept
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    res = lab.cli("copy-disk", str(src), str(dst), "--compress", "off", "--json")
    assert res.returncode == 0, res.stderr
    outcome = json.loads(res.stdout)
    assert outcome["resumed"] and outcome["skipped_bytes"] > 0
    assert dst.read_bytes() == src.read_bytes()
