"""SSH host keys are always checked, against the inventory only (never ~/.ssh/config):
an in-process asyncssh server plays the host."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest
from typer.testing import CliRunner

from vmigrate.cli.main import app
from vmigrate.config import HostConfig, Inventory, dump_inventory, parse_inventory
from vmigrate.errors import ConfigError, HostKeyError, HostUnreachableError, VmigrateError
from vmigrate.hosts import (
    SSHHost,
    fingerprint,
    known_hosts_path,
    known_keys,
    open_host,
    record_host_key,
)


@dataclass
class FakeSshd:
    port: int
    host_key: asyncssh.SSHKey
    client_key: Path
    commands: list[str] = field(default_factory=list)


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[FakeSshd]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    client_path = tmp_path / "id_ed25519"
    client.write_private_key(str(client_path))
    commands: list[str] = []

    def handle(process: asyncssh.SSHServerProcess[str]) -> None:
        commands.append(str(process.command))
        process.stdout.write("ran\n")
        process.exit(0)

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client.export_public_key().decode()),
        process_factory=handle, config=None)
    port = server.sockets[0].getsockname()[1]
    try:
        yield FakeSshd(port, host_key, client_path, commands)
    finally:
        server.close()
        await server.wait_closed()


def ssh_host(sshd: FakeSshd, known: Path | None, pin: str | None = None) -> SSHHost:
    return SSHHost("h1", "127.0.0.1", port=sshd.port, key=sshd.client_key,
                   known_hosts=known, host_key=pin, connect_timeout=5)


def known_file(path: Path, sshd: FakeSshd, key: asyncssh.SSHKey) -> Path:
    kind, data = key.export_public_key().decode().split()[:2]
    path.write_text(f"[127.0.0.1]:{sshd.port} {kind} {data}\n")
    return path


async def test_recorded_key_connects(sshd: FakeSshd, tmp_path: Path) -> None:
    known = known_file(tmp_path / "kh", sshd, sshd.host_key)
    async with ssh_host(sshd, known) as host:
        res = await host.run(["echo", "x"])
    assert res.stdout == "ran\n" and sshd.commands == ["echo x"]


async def test_changed_key_is_a_host_key_error_naming_both(sshd: FakeSshd,
                                                           tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519")
    known = known_file(tmp_path / "kh", sshd, other)
    host = ssh_host(sshd, known)
    with pytest.raises(HostKeyError) as info:
        await host.run(["touch", "/tmp/never"])
    err = info.value
    assert err.exit_code == 7 and not isinstance(err, HostUnreachableError)
    assert err.host == "h1"
    assert err.offered == fingerprint(sshd.host_key)
    assert err.known == [fingerprint(other)]
    assert fingerprint(sshd.host_key) in str(err) and fingerprint(other) in str(err)
    assert sshd.commands == []


async def test_key_of_another_kind_is_refused(sshd: FakeSshd, tmp_path: Path) -> None:
    # the host now offers only an ed25519 key; an RSA one was recorded
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    known = known_file(tmp_path / "kh", sshd, rsa)
    with pytest.raises(HostKeyError) as info:
        await ssh_host(sshd, known).run(["true"])
    assert info.value.offered == fingerprint(sshd.host_key)
    assert sshd.commands == []


async def test_no_recorded_key_is_refused(sshd: FakeSshd, tmp_path: Path) -> None:
    for known in (tmp_path / "absent", None):
        with pytest.raises(HostKeyError) as info:
            await ssh_host(sshd, known).run(["true"])
        assert info.value.known == [] and info.value.offered == fingerprint(sshd.host_key)
    assert sshd.commands == []


async def test_user_ssh_config_cannot_turn_checking_off(
        sshd: FakeSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host *\n  UserKnownHostsFile none\n  StrictHostKeyChecking no\n"
        "  GlobalKnownHostsFile none\n")
    # a ~/.ssh/known_hosts that would trust it is not read either
    known_file(home / ".ssh" / "known_hosts", sshd, sshd.host_key)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(HostKeyError):
        await ssh_host(sshd, tmp_path / "empty").run(["true"])
    assert sshd.commands == []


async def test_pinned_fingerprint(sshd: FakeSshd, tmp_path: Path) -> None:
    async with ssh_host(sshd, None, fingerprint(sshd.host_key)) as host:
        await host.run(["true"])
    assert sshd.commands == ["true"]
    # a pin decides alone: a known_hosts file trusting the key does not help a wrong pin
    wrong = fingerprint(asyncssh.generate_private_key("ssh-ed25519"))
    known = known_file(tmp_path / "kh", sshd, sshd.host_key)
    with pytest.raises(HostKeyError) as info:
        await ssh_host(sshd, known, wrong).run(["false"])
    assert info.value.known == [wrong]
    assert sshd.commands == ["true"]


def test_host_key_pin_format() -> None:
    base = "[hosts.h1]\ndata_dir = '/d'\n"
    good = "SHA256:" + "A" * 43
    assert parse_inventory(base + f"host_key = '{good}'\n").host("h1").host_key == good
    for bad in ("", "MD5:aa", "SHA256:short", "SHA256:" + "A" * 43 + "\nx", good + " x"):
        with pytest.raises(ConfigError):
            parse_inventory(base + f"host_key = {json.dumps(bad)}\n")


def test_default_known_hosts_is_vmigrates_own(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    cfg = HostConfig(name="h1", data_dir=Path("/d"))
    assert known_hosts_path(cfg) == tmp_path / "known_hosts"
    host = open_host(cfg)
    assert isinstance(host, SSHHost) and host.known_hosts == tmp_path / "known_hosts"
    cfg2 = cfg.model_copy(update={"known_hosts": tmp_path / "k2"})
    assert known_hosts_path(cfg2) == tmp_path / "k2"


def test_record_host_key_replaces_only_that_address(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "known_hosts"
    k1, k2, k3 = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(3))
    assert record_host_key(path, "10.0.0.1", 22, k1) == []
    assert record_host_key(path, "10.0.0.2", 2222, k3) == []
    assert record_host_key(path, "10.0.0.1", 22, k2) == [fingerprint(k1)]
    assert [fingerprint(k) for k in known_keys(path, "10.0.0.1", 22)] == [fingerprint(k2)]
    assert [fingerprint(k) for k in known_keys(path, "10.0.0.2", 2222)] == [fingerprint(k3)]
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError):
        record_host_key(path, "a b", 22, k1)
    with pytest.raises(ConfigError):  # unreadable
        known_keys(tmp_path, "10.0.0.1", 22)


# -- vmigrate host trust --------------------------------------------------------------


def _inventory(tmp_path: Path, sshd: FakeSshd, **extra: object) -> Path:
    cfg = HostConfig(name="h1", address="127.0.0.1", port=sshd.port, key=sshd.client_key,
                     data_dir=tmp_path / "data", **extra)  # type: ignore[arg-type]
    path = tmp_path / "inv.toml"
    path.write_text(dump_inventory(Inventory(hosts={"h1": cfg})))
    return path


def _cli(inv: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    """Exit status as ``vmigrate`` gives it (main() maps our errors to theirs)."""
    res = CliRunner().invoke(app, ["--config", str(inv), *args], input=input)
    if isinstance(res.exception, VmigrateError):
        return res.exception.exit_code, res.stdout, str(res.exception)
    return res.exit_code, res.stdout, res.stderr


async def test_host_trust_records_on_purpose(sshd: FakeSshd, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path / "home"))
    inv = _inventory(tmp_path, sshd)
    known = tmp_path / "home" / "known_hosts"
    # no --yes and no terminal: refused, nothing written
    code, _out, _err = await asyncio.to_thread(_cli, inv, "host", "trust", "h1")
    assert code == 2 and not known.exists()
    code, out, _err = await asyncio.to_thread(_cli, inv, "host", "trust", "h1", "--yes",
                                              "--json")
    assert code == 0, _err
    data = json.loads(out)
    assert data["fingerprint"] == fingerprint(sshd.host_key) and data["changed"] is True
    assert data["known_hosts"] == str(known)
    async with open_host(parse_inventory(inv.read_text()).host("h1")) as host:
        await host.run(["true"])
    assert sshd.commands == ["true"]
    # again: already known, nothing changes
    code, out, _err = await asyncio.to_thread(_cli, inv, "host", "trust", "h1", "--yes",
                                              "--json")
    assert code == 0 and json.loads(out)["changed"] is False


async def test_host_trust_refusals(sshd: FakeSshd, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path / "home"))
    pinned = _inventory(tmp_path, sshd, host_key=fingerprint(sshd.host_key))
    code, _o, _e = await asyncio.to_thread(_cli, pinned, "host", "trust", "h1", "--yes")
    assert code == 2
    code, _o, _e = await asyncio.to_thread(_cli, pinned, "host", "trust", "nope", "--yes")
    assert code == 2
    assert not (tmp_path / "home" / "known_hosts").exists()


def test_record_host_key_drops_hashed_entries_and_keeps_patterns(tmp_path: Path) -> None:
    import base64
    import hashlib
    import hmac
    import os

    old, new, other = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(3))
    salt = os.urandom(20)
    digest = hmac.new(salt, b"10.0.0.1", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"

    def line(host: str, key: asyncssh.SSHKey) -> str:
        return f"{host} " + " ".join(key.export_public_key().decode().split()[:2])

    path = tmp_path / "known_hosts"
    path.write_text("\n".join([line(hashed, old), line("10.0.0.*", other),
                               line("10.0.0.9", other)]) + "\n")
    assert {fingerprint(k) for k in known_keys(path, "10.0.0.1", 22)} == {
        fingerprint(old), fingerprint(other)}
    record_host_key(path, "10.0.0.1", 22, new)
    assert fingerprint(old) not in {fingerprint(k) for k in known_keys(path, "10.0.0.1", 22)}
    assert len(path.read_text().splitlines()) == 3  # pattern and other host kept
