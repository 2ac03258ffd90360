"""Live migration over TLS between two lab hosts, with the credentials ``lab up`` made.

The source guest is started with ``vmigrate vm create`` on h1; the destination
QEMU is started by hand on h2 with ``-incoming defer`` (the migration engine does
this in production). Both load ``tls-creds-x509`` from their host's ``tls_path``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.e2e.conftest import Lab
from tests.e2e.test_vms import qemu_pids
from vmigrate import pki
from vmigrate.cli import certs as certs_cli
from vmigrate.config import HostConfig, dump_inventory
from vmigrate.hosts import Host, open_host
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
        res = await host.sh(f"cat {shlex.quote(log)} 2>/dev/null", check=False)
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
    q = shlex.quote(paths.dir)
    await host.sh(f"mkdir -p {q} && rm -f {q}/qmp.sock {q}/console.sock {q}/qemu.pid")
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
