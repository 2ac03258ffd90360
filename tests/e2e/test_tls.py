"""Live migration over TLS between two lab hosts, with the credentials ``lab up`` made.

The source guest is started with ``vmigrate vm create`` on h1; the destination
QEMU is started by hand on h2 with ``-incoming defer`` (the migration engine does
this in production). Both load ``tls-creds-x509`` from their host's ``tls_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.e2e.conftest import Lab
from tests.e2e.test_live import audit_size, slow_links, vm_pid_on  # noqa: F401 (fixture)
from tests.e2e.test_vms import qemu_pids, wait_for_console
from vmigrate import pki
from vmigrate.cli import certs as certs_cli
from vmigrate.config import HostConfig, dump_inventory
from vmigrate.hosts import Host, open_host
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.links import host_netns
from vmigrate.lab.probe import DowntimeProbe, ProbeResult
from vmigrate.qemu import process
from vmigrate.qemu.argv import build_argv
from vmigrate.qemu.qmp import QmpSession, qmp_session
from vmigrate.qemu.spec import VMSpec

pytestmark = pytest.mark.lab

WORKLOAD = "memtouch:wss=16M,rate=1000"
MEMCHECK = re.compile(r"MEMCHECK pass=(\d+) ok")


# -- helpers ---------------------------------------------------------------------


def memchecks(text: str) -> list[int]:
    assert "MEMCHECK FAIL" not in text, text[-2000:]
    return [int(m.group(1)) for m in MEMCHECK.finditer(text)]


async def wait_memcheck(host: Host, log: str, *, above: int, timeout: float) -> int:
    """Wait for a ``MEMCHECK pass=N ok`` line with N > ``above`` in the console log."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        res = await host.run(["cat", "--", log], check=False)
        text = res.stdout
        passes = [n for n in memchecks(text) if n > above]
        if passes:
            return max(passes)
        await asyncio.sleep(0.5)
    raise AssertionError(f"no MEMCHECK pass > {above} in {log}; last output:\n{text[-2000:]}")


def create_guest(lab: Lab, name: str) -> tuple[VMSpec, str]:
    info = lab.cli_json("vm", "create", name, "--host", "h1", "--memory", "256M",
                        "--workload", WORKLOAD)
    assert isinstance(info, dict)
    return VMSpec.model_validate(info["spec"]), str(info["ip"])


async def start_incoming(host: Host, cfg: HostConfig, spec: VMSpec) -> int:
    """The same VM on ``cfg`` waiting for a migration (``-incoming defer``); its PID."""
    paths = process.vm_paths(cfg, spec.name)
    d = paths.dir
    await host.run(["mkdir", "-p", "--", d])
    await host.run(["rm", "-f", "--", f"{d}/qmp.sock", f"{d}/console.sock", f"{d}/qemu.pid"])
    await process._setup_taps(host, cfg, spec)
    argv = build_argv(spec, paths, binary=cfg.qemu_binary, accel="tcg", incoming="defer")
    await host.run(argv)
    pid = await process.vm_pid(host, paths)
    assert pid is not None
    return pid


async def add_tls(qmp: QmpSession, tls_dir: Path | str, endpoint: str) -> None:
    await qmp.execute("object-add", {
        "qom-type": "tls-creds-x509", "id": "tls0", "dir": str(tls_dir),
        "endpoint": endpoint, "verify-peer": True,
    })
    await qmp.execute("migrate-set-parameters", {"tls-creds": "tls0"})


async def wait_migration(qmp: QmpSession, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info.get("status") in {"completed", "failed", "cancelled"}:
            return info
        assert time.monotonic() < deadline, f"migration still {info.get('status')}: {info}"
        await asyncio.sleep(0.1)


def port() -> int:
    return 20000 + secrets.randbelow(20000)


# -- tests -----------------------------------------------------------------------


def test_lab_hosts_have_tls_credentials(lab: Lab) -> None:
    assert lab.inventory.lab is not None
    ca = lab.inventory.lab.dir / "pki"
    ca_pem = (ca / pki.CA_CERT).read_bytes()
    for cfg in lab.inventory.hosts.values():
        tls = cfg.tls_path
        assert tls == cfg.data_dir / "tls"
        assert sorted(p.name for p in tls.iterdir()) == sorted(pki.QEMU_FILES)
        assert (tls / pki.CA_CERT).read_bytes() == ca_pem
        info = pki.cert_info((tls / pki.SERVER_CERT).read_bytes())
        assert info.dns_names == (cfg.name,)
        assert info.ip_addresses == (cfg.address, cfg.migration_address)
        assert pki.issued_by((tls / pki.CLIENT_CERT).read_bytes(), ca_pem)
        assert (tls / pki.SERVER_KEY).stat().st_mode & 0o077 == 0


async def test_live_migration_over_tls(lab: Lab) -> None:
    assert lab.inventory.lab is not None
    name = "tls-ok"
    cfg1, cfg2 = lab.inventory.host("h1"), lab.inventory.host("h2")
    spec, ip = create_guest(lab, name)
    paths1, paths2 = process.vm_paths(cfg1, name), process.vm_paths(cfg2, name)
    host1, host2 = open_host(cfg1), open_host(cfg2)
    try:
        before = await wait_memcheck(host1, paths1.console_log, above=0, timeout=180)
        dst_pid = await start_incoming(host2, cfg2, spec)
        uri = f"tcp:{cfg2.migration_address}:{port()}"
        async with qmp_session(host1, paths1.qmp, vm=name) as src, \
                qmp_session(host2, paths2.qmp, vm=name) as dst:
            assert await dst.query_status() == "inmigrate"
            await add_tls(src, cfg1.tls_path, "client")
            await add_tls(dst, cfg2.tls_path, "server")
            # no tls-hostname: the client checks the IP of the URI against the IP SANs
            await dst.execute("migrate-incoming", {"uri": uri})
            probe = DowntimeProbe(lab.inventory.lab.probe_netns, ip, max_seconds=240)
            with probe:
                probe.wait_reply(timeout=10, count=20)
                t0 = time.monotonic()
                await src.execute("migrate", {"uri": uri})
                info = await wait_migration(src)
                elapsed = time.monotonic() - t0
                # the guest answers from h2 before the probe stops
                await asyncio.to_thread(probe.wait_reply, 10, probe.replies() + 50)
                observed: ProbeResult = await probe.astop()
            assert info["status"] == "completed", info
            assert await dst.query_status() == "running"
            assert await src.query_status() == "postmigrate"
            params = await src.execute("query-migrate-parameters")
            assert params["tls-creds"] == "tls0"
        after = await wait_memcheck(host2, paths2.console_log, above=before, timeout=120)
        assert await process.vm_pid(host2, paths2) == dst_pid
        print(f"\nTLS migration {info['status']} in {elapsed:.2f} s (QEMU total-time "
              f"{info.get('total-time')} ms, downtime {info.get('downtime')} ms, setup "
              f"{info.get('setup-time')} ms, transferred {info['ram']['transferred']} B); "
              f"observed downtime {observed.longest_gap_ms:.1f} ms, "
              f"{observed.received}/{observed.sent} replies; MEMCHECK pass {before} on h1 "
              f"-> {after} on h2")
        assert observed.received > 0 and not observed.deadline_hit
    finally:
        await process.stop_vm(host2, cfg2, spec, force=True)
        await process.remove_vm_dir(host2, cfg2, name)
        res = lab.cli("vm", "destroy", name)
        await host1.close()
        await host2.close()
    assert res.returncode == 0, res.stderr
    assert qemu_pids(lab) == []


async def test_destination_with_another_ca_fails_and_source_runs(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tls-bad"
    cfg1, cfg2 = lab.inventory.host("h1"), lab.inventory.host("h2")
    # h2's credentials from another CA, pushed over SSH by 'vmigrate certs issue' into a
    # separate tls dir (the lab's own stay untouched for the other tests)
    rogue_tls = cfg2.data_dir / "tls-rogue"
    rogue_inv = lab.inventory.model_copy(update={"hosts": {
        **lab.inventory.hosts, "h2": cfg2.model_copy(update={"tls_dir": rogue_tls})}})
    (tmp_path / "rogue.toml").write_text(dump_inventory(rogue_inv))
    monkeypatch.setenv("VMIGRATE_CONFIG", str(tmp_path / "rogue.toml"))
    monkeypatch.setenv("VMIGRATE_HOME", str(lab.home))
    runner = CliRunner()
    for args in (["init", "--dir", str(tmp_path / "rogue-ca")],
                 ["issue", "h2", "--push", "--dir", str(tmp_path / "rogue-ca")]):
        # in a thread: the command runs its own event loop
        res = await asyncio.to_thread(runner.invoke, certs_cli.app, args)
        assert res.exit_code == 0, (res.output, res.exception)
    assert sorted(p.name for p in rogue_tls.iterdir()) == sorted(pki.QEMU_FILES)
    lab_ca = (cfg1.tls_path / pki.CA_CERT).read_bytes()
    assert not pki.issued_by((rogue_tls / pki.SERVER_CERT).read_bytes(), lab_ca)

    spec, _ip = create_guest(lab, name)
    paths1, paths2 = process.vm_paths(cfg1, name), process.vm_paths(cfg2, name)
    host1, host2 = open_host(cfg1), open_host(cfg2)
    try:
        before = await wait_memcheck(host1, paths1.console_log, above=0, timeout=180)
        await start_incoming(host2, cfg2, spec)
        uri = f"tcp:{cfg2.migration_address}:{port()}"
        async with qmp_session(host1, paths1.qmp, vm=name) as src:
            async with qmp_session(host2, paths2.qmp, vm=name) as dst:
                await add_tls(src, cfg1.tls_path, "client")
                await add_tls(dst, rogue_tls, "server")
                await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            info = await wait_migration(src, timeout=60)
            assert info["status"] == "failed", info
            print(f"\nmigration to a destination of another CA: {info['status']}: "
                  f"{info.get('error-desc')}")
            assert await src.query_status() == "running"
        after = await wait_memcheck(host1, paths1.console_log, above=before, timeout=120)
        assert after > before
        assert await process.vm_state(host1, cfg1, name) == process.VmState.RUNNING
    finally:
        await process.stop_vm(host2, cfg2, spec, force=True)
        await process.remove_vm_dir(host2, cfg2, name)
        await host2.run(["rm", "-rf", "--", str(rogue_tls)], check=False)
        res2 = lab.cli("vm", "destroy", name)
        await host1.close()
        await host2.close()
    assert res2.returncode == 0, res2.stderr
    assert qemu_pids(lab) == []


# -- TLS that authorises (issue 13) -------------------------------------------------------
#
# One guest with a disk for the module (booted once); the refusals in begin run first,
# then an online migration during which another host's certificate knocks on the
# destination's NBD export and migration port from h1's namespace.

AUTHZ_VM = "tlsauthz"
MiB = 1 << 20


def _records(lab: Lab, after: int) -> list[dict[str, Any]]:
    path = lab.home / "audit.jsonl"
    if not path.exists():  # a fresh lab: no job yet
        return []
    out = []
    for line in path.read_bytes()[after:].decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _find(obj: object, key: str, value: str) -> dict[str, Any] | None:
    """The first dict inside ``obj`` holding ``key: value`` (the record layout may nest)."""
    if isinstance(obj, dict):
        if obj.get(key) == value:
            return obj
        children: Iterable[object] = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _find(child, key, value)
        if found is not None:
            return found
    return None


def _wait_decision(lab: Lab, decision: str, after: int, timeout: float = 120
                   ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in _records(lab, after):
            found = _find(rec, "decision", decision)
            if found is not None:
                return found
        time.sleep(0.05)
    raise AssertionError(f"no {decision} decision in the audit log")


def _netns_run(lab: Lab, host: str, argv: list[str], timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
    ns = host_netns(lab.home, host, lab.name)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _inventory_with(lab: Lab, tmp: Path, **h2: object) -> Path:
    cfg2 = lab.inventory.host("h2").model_copy(update=h2)
    inv = lab.inventory.model_copy(update={"hosts": {**lab.inventory.hosts, "h2": cfg2}})
    path = tmp / f"inv-{secrets.token_hex(3)}.toml"
    path.write_text(dump_inventory(inv))
    return path


@pytest.fixture(scope="module")
def authz_guest(lab: Lab) -> Iterator[str]:
    h1_pool = lab.inventory.host("h1").pools["local"]
    h1_pool.mkdir(parents=True, exist_ok=True)
    disk = h1_pool / f"{AUTHZ_VM}.raw"
    # 32 MiB of random data: the mirror takes seconds over a slowed link (the NBD
    # export and the migration port stay open until the switchover anyway)
    thin_raw_image(disk, 128 * MiB, 32 * MiB)
    res = lab.cli("vm", "create", AUTHZ_VM, "--host", "h1", "--memory", "128M",
                  "--workload", "idle", "--disk", f"{disk},format=raw,cache=none")
    try:
        assert res.returncode == 0, res.stderr
        wait_for_console(lab, AUTHZ_VM, r"VMIGRATE READY", timeout=120)
        yield AUTHZ_VM
    finally:
        # a job left waiting for an operator keeps the VM locked: settle it first
        jobs = lab.cli_json("job", "list", "--active")
        assert isinstance(jobs, list)
        for j in jobs:
            if j["vm"] == AUTHZ_VM and j["status"] == "needs-operator":
                lab.cli("job", "resolve", j["id"], "--keep", "destination", "--yes")
        lab.cli("vm", "destroy", AUTHZ_VM)
        for host in ("h1", "h2"):
            for p in lab.inventory.host(host).pools["local"].glob(f"{AUTHZ_VM}*"):
                p.unlink(missing_ok=True)
        assert qemu_pids(lab) == []


def _nothing_started(lab: Lab, vm: str, report: dict[str, Any]) -> None:
    assert report["status"] == "failed" and report["phase"] == "begin", report
    assert vm_pid_on(lab, "h2", vm) is None
    assert vm_pid_on(lab, "h1", vm) is not None
    assert list(lab.inventory.host("h2").pools["local"].glob(f"{vm}*")) == []
    state = lab.cli_json("vm", "show", vm)
    assert isinstance(state, dict) and state["host"] == "h1" and state["state"] == "running"


@pytest.mark.parametrize("case", ["expired", "other-ca"])
def test_begin_refuses_expired_or_foreign_certificates(lab: Lab, authz_guest: str,
                                                       tmp_path: Path, case: str) -> None:
    assert lab.inventory.lab is not None
    cfg2 = lab.inventory.host("h2")
    addresses = [cfg2.address, str(cfg2.migration_address)]
    if case == "expired":
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        files = pki.host_credentials(lab.inventory.lab.dir / "pki", "h2", addresses,
                                     now=long_ago, days=30)
    else:
        pki.create_ca(tmp_path / "rogue-ca")
        files = pki.host_credentials(tmp_path / "rogue-ca", "h2", addresses)
    tls = cfg2.data_dir / f"tls-{case}"
    pki.write_local(tls, files)
    try:
        inv = _inventory_with(lab, tmp_path, tls_dir=tls)
        res = lab.cli("--config", str(inv), "migrate", authz_guest, "--to", "h2",
                      "--mode", "online", "--json")
        assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
        report = json.loads(res.stdout)
        print(f"\n{case}: exit {res.returncode}: {report['error']}")
        _nothing_started(lab, authz_guest, report)
    finally:
        shutil.rmtree(tls, ignore_errors=True)


def test_only_the_source_may_connect_during_a_migration(
        lab: Lab, authz_guest: str, tmp_path: Path,
        slow_links: Callable[[str], None]) -> None:  # noqa: F811
    assert lab.inventory.lab is not None
    cfg1, cfg2 = lab.inventory.host("h1"), lab.inventory.host("h2")
    # a certificate of the lab's own CA for a host that is not the job's source
    h3 = tmp_path / "h3-tls"
    pki.write_local(h3, pki.host_credentials(lab.inventory.lab.dir / "pki", "h3",
                                             ["10.99.0.3"]))
    slow_links("80mbit")
    offset = audit_size(lab)
    proc = lab.popen("migrate", authz_guest, "--to", "h2", "--mode", "online", "--json")
    tries: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        nbd = _wait_decision(lab, "nbd-export", offset)
        address, port, export = nbd["address"], int(nbd["port"]), nbd["exports"][0]
        assert nbd["authz"] == f"O=vmigrate,CN={cfg1.name}", nbd

        def nbd_info(tls_dir: Path) -> subprocess.CompletedProcess[str]:
            return _netns_run(lab, "h1", [
                "qemu-img", "info", "--object",
                f"tls-creds-x509,id=t0,dir={tls_dir},endpoint=client",
                "--image-opts",
                f"driver=nbd,host={address},port={port},export={export},tls-creds=t0"])

        tries["nbd-h3"] = nbd_info(h3)
        tries["nbd-h1"] = nbd_info(cfg1.tls_path)  # the control: the source's own
        # the migration port: the destination QEMU's other listening socket
        qpid = vm_pid_on(lab, "h2", authz_guest)
        ss = _netns_run(lab, "h2", ["ss", "-Hltnp"]).stdout
        ports = {int(m.group(1)) for m in re.finditer(
            rf"{re.escape(address)}:(\d+)\s.*pid={qpid},", ss)}
        mig_ports = sorted(ports - {port})
        assert len(mig_ports) == 1, ss
        tries["migration-h3"] = _netns_run(lab, "h1", [
            "openssl", "s_client", "-connect", f"{address}:{mig_ports[0]}",
            "-cert", str(h3 / pki.CLIENT_CERT), "-key", str(h3 / pki.CLIENT_KEY),
            "-CAfile", str(h3 / pki.CA_CERT), "-verify_return_error", "-quiet"],
            timeout=20)
        after = _netns_run(lab, "h2", ["ss", "-Hltn"]).stdout
        tries_listening = f"{address}:{mig_ports[0]}" in after
        out, errs = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()  # the controller we started, by its PID
            proc.communicate()
    for name, res in tries.items():
        print(f"\n{name}: exit {res.returncode}: {(res.stderr or res.stdout).strip()[-300:]}")
    assert tries["nbd-h3"].returncode != 0
    assert tries["nbd-h1"].returncode == 0, tries["nbd-h1"].stderr
    assert tries_listening  # h3's handshake did not take the destination's listener
    assert proc.returncode == 0, errs[-3000:]
    report = json.loads(out)
    assert report["status"] == "completed" and report["tls"] is True
    assert report["verification"]["dest_running"] is True
    log = (cfg2.data_dir / "vms" / authz_guest / "qemu.log").read_text(errors="replace")
    denied = [line for line in log.splitlines() if "authz" in line]
    print("destination QEMU:", *denied[-3:], sep="\n  ")
    assert any("CN=h3" in line for line in denied)
