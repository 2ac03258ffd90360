"""The SSH transport against a real sshd in a lab host namespace."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
from vmigrate import pki
from vmigrate.config import dump_inventory
from vmigrate.errors import CommandError, HostError
from vmigrate.hosts import open_host

pytestmark = pytest.mark.lab


async def test_ssh_run_copy_and_socket_forward(lab: Lab, tmp_path: Path) -> None:
    cfg = lab.inventory.host("h1")
    async with open_host(cfg) as host:
        # commands run inside the host's namespace: its management address is there
        res = await host.run(["ip", "-o", "-4", "addr", "show"])
        assert cfg.address in res.stdout
        with pytest.raises(CommandError) as info:
            await host.run(["sh", "-c", "exit 7"])
        assert info.value.status == 7
        # files both ways
        payload = os.urandom(300_000)
        (tmp_path / "up").write_bytes(payload)
        remote = f"{cfg.data_dir}/copied"
        await host.put_file(tmp_path / "up", remote)
        await host.get_file(remote, tmp_path / "down")
        assert (tmp_path / "down").read_bytes() == payload
        with pytest.raises(HostError):
            await host.get_file(f"{cfg.data_dir}/absent", tmp_path / "x")
        await host.write_file(f"{cfg.data_dir}/w", b"hello")
        assert await host.read_file(f"{cfg.data_dir}/w") == b"hello"
        assert await host.missing([remote, f"{cfg.data_dir}/nope"]) == [f"{cfg.data_dir}/nope"]
        await host.run(["rm", "-f", remote, f"{cfg.data_dir}/w"])


def _accepted(lab: Lab, host: str) -> int:
    """Logins h2's sshd accepted so far (its log, -E)."""
    assert lab.inventory.lab is not None
    log = lab.inventory.lab.dir / "hosts" / host / "sshd.log"
    return log.read_text(errors="replace").count("Accepted publickey")


def test_changed_host_key_is_refused_whatever_ssh_config_says(lab: Lab,
                                                              tmp_path: Path) -> None:
    """A host key that is not the recorded one -> the host-key error (exit 7) naming
    the host and both fingerprints, nothing run there, even with a ~/.ssh/config that
    turns checking off; 'host trust' records the real key on purpose."""
    cfg2 = lab.inventory.host("h2")
    # the operator's ssh config would turn host key checking off
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host *\n  UserKnownHostsFile none\n  StrictHostKeyChecking no\n"
        "  GlobalKnownHostsFile none\n")
    # h2's key as recorded is not the one it offers (as after a reinstall, or a man in
    # the middle)
    wrong = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
                   check=True)
    kind, data = (tmp_path / "wrong.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"{cfg2.address} {kind} {data}\n")
    sentinel = cfg2.data_dir / f"tls-hostkey-{secrets.token_hex(3)}"
    inv = lab.inventory.model_copy(update={"hosts": {
        **lab.inventory.hosts,
        "h2": cfg2.model_copy(update={"known_hosts": known, "tls_dir": sentinel})}})
    (tmp_path / "inv.toml").write_text(dump_inventory(inv))
    env = {**lab.env(), "HOME": str(home), "VMIGRATE_CONFIG": str(tmp_path / "inv.toml")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    def fp(pub: Path) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True,
                             text=True, check=True).stdout
        return out.split()[1]

    assert lab.inventory.lab is not None
    real = fp(lab.inventory.lab.dir / "hosts" / "h2" / "ssh_host_ed25519_key.pub")
    assert cli("certs", "init", "--dir", str(tmp_path / "ca")).returncode == 0
    logins = _accepted(lab, "h2")
    try:
        # 'certs issue --push' would write the sentinel dir on h2 if it ran there
        res = cli("certs", "issue", "h2", "--push", "--dir", str(tmp_path / "ca"))
        print(f"\nexit {res.returncode}: {res.stderr.strip()}")
        assert res.returncode == 7, res.stderr
        assert "Traceback" not in res.stderr
        assert "h2" in res.stderr and real in res.stderr and fp(tmp_path / "wrong.pub") in \
            res.stderr
        assert not sentinel.exists()
        assert _accepted(lab, "h2") == logins  # no login: nothing ran on h2
        # recording the host's key on purpose: shows it, replaces the wrong one
        res = cli("host", "trust", "h2", "--json")  # no terminal, no --yes: refused
        assert res.returncode == 2 and known.read_text().split()[2] == data
        res = cli("host", "trust", "h2", "--yes", "--json")
        assert res.returncode == 0, res.stderr
        trusted = json.loads(res.stdout)
        assert trusted["fingerprint"] == real and trusted["changed"] is True
        assert trusted["previous"] == [fp(tmp_path / "wrong.pub")]
        res = cli("certs", "issue", "h2", "--push", "--dir", str(tmp_path / "ca"))
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in sentinel.iterdir()) == sorted(pki.QEMU_FILES)
    finally:
        shutil.rmtree(sentinel, ignore_errors=True)
