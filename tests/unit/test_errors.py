"""Foreign errors are translated at the boundary into vmigrate's tree."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmigrate.errors import CommandError, HostError, HostUnreachableError, QmpError, UserError
from vmigrate.hosts import LocalHost, SSHHost
from vmigrate.qemu.qmp import qmp_session
from vmigrate.testing.fakeqmp import HANGUP, Error, FakeQmpServer


async def test_qmp_error_carries_class(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    replies = {"query-status": {"status": "running", "running": True},
               "cont": Error("GenericError", "nope")}
    async with FakeQmpServer(sock, replies) as server, \
            qmp_session(LocalHost("ctl"), sock, vm="t") as qmp:
        assert await qmp.query_status() == "running"
        with pytest.raises(QmpError) as info:
            await qmp.execute("cont")
        assert info.value.error_class == "GenericError"
        raw = await qmp.execute_raw({"execute": "stop"})
        assert raw["error"]["class"] == "CommandNotFound"
    assert [m["execute"] for m in server.received] == [
        "qmp_capabilities", "query-status", "cont", "stop"]


async def test_qmp_hangup_is_qmp_error(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    async with FakeQmpServer(sock, {"quit": HANGUP}), \
            qmp_session(LocalHost("ctl"), sock, vm="t") as qmp:
        with pytest.raises(QmpError) as info:
            await qmp.execute("quit")
        assert info.value.error_class is None


async def test_qmp_no_socket(tmp_path: Path) -> None:
    with pytest.raises(QmpError):
        async with qmp_session(LocalHost("ctl"), str(tmp_path / "none.sock"), timeout=2):
            pass


async def test_qmp_raw_rejects_non_command(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    async with FakeQmpServer(sock), qmp_session(LocalHost("ctl"), sock) as qmp:
        with pytest.raises(QmpError):
            await qmp.execute_raw({"arguments": {}})


async def test_local_command_error() -> None:
    host = LocalHost("ctl")
    res = await host.run(["sh", "-c", "echo out; exit 0"])
    assert res.stdout == "out\n"
    with pytest.raises(CommandError) as info:
        await host.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.status == 3
    missing = await host.run(["/nonexistent/binary"], check=False)
    assert missing.status == 127


async def test_ssh_unreachable_translated() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = SSHHost("h", "127.0.0.1", port=port, connect_timeout=3)
    with pytest.raises(HostUnreachableError):
        await host.run(["true"])
    await host.close()


def test_user_errors_exit_2() -> None:
    from vmigrate.errors import ConfigError, ConflictError, NotFoundError, SpecError

    for cls in (ConfigError, SpecError, NotFoundError, ConflictError):
        assert issubclass(cls, UserError) and cls.exit_code == 2


async def test_local_file_copy(tmp_path: Path) -> None:
    host = LocalHost("ctl")
    src = tmp_path / "a"
    src.write_bytes(b"x" * 100_000)
    await host.put_file(src, str(tmp_path / "b"))
    await host.get_file(str(tmp_path / "b"), tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == src.read_bytes()
    with pytest.raises(HostError):
        await host.put_file(tmp_path / "absent", str(tmp_path / "d"))
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.part").exists()


def test_state_and_migration_errors_are_not_user_errors() -> None:
    from vmigrate.errors import (
        Cancelled,
        MigrationError,
        MigrationFailed,
        NeedsOperator,
        QmpCommandError,
        QmpConnectionError,
        QmpError,
        StateError,
    )

    # exit 2 means "nothing was changed": neither of these can promise it
    assert not issubclass(StateError, UserError) and StateError.exit_code != 2
    for cls in (MigrationFailed, Cancelled, NeedsOperator):
        assert issubclass(cls, MigrationError) and not issubclass(cls, UserError)
    assert NeedsOperator.exit_code == 4
    assert QmpCommandError("x", "DeviceNotFound").error_class == "DeviceNotFound"
    assert QmpConnectionError("gone").error_class is None
    assert issubclass(QmpCommandError, QmpError) and issubclass(QmpConnectionError, QmpError)
