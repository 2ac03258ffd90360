"""The SSH transport against a real sshd in a lab host namespace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
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
