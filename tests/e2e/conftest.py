"""Fixtures for end-to-end tests: a real lab (namespaces, sshd, QEMU) per session.

Every lab carries a unique name, and is torn down in ``finally`` even when a
test fails; processes are stopped by the PIDs the lab recorded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmigrate.config import Inventory

NEEDS = ["qemu-system-x86_64", "qemu-img", "ip", "tc", "sshd"]


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [b for b in NEEDS if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"missing binaries: {', '.join(missing)}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_skip_reason()
    if reason is None:
        return
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Lab:
    """A running lab and a way to drive the real ``vmigrate`` command against it."""

    home: Path
    name: str
    inventory: Inventory

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VMIGRATE_HOME"] = str(self.home)
        env.pop("VMIGRATE_CONFIG", None)
        return env

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run ``vmigrate ARGS`` as a separate process, as a user would."""
        return subprocess.run(
            [sys.executable, "-m", "vmigrate.cli.main", *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout, check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start ``vmigrate ARGS`` in the background; the caller stops it by its PID."""
        return LabProcess([sys.executable, "-m", "vmigrate.cli.main", *args], self.env())

    def cli_json(self, *args: str, timeout: float = 180) -> object:
        res = self.cli(*args, "--json", timeout=timeout)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)



class LabProcess(subprocess.Popen[str]):
    """A controller started in the background. Its stderr goes to a file, not a pipe: a
    verbose controller logs more than a pipe holds, and would block on a full pipe
    while the test waits for what it does. ``communicate`` returns it as usual."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives with the process)
        super().__init__(argv, env=env, stdout=subprocess.PIPE, stderr=self._errors,
                         text=True)

    def communicate(self, input: str | None = None, timeout: float | None = None
                    ) -> tuple[str, str]:
        out, _ = super().communicate(input, timeout)
        self._errors.seek(0)
        return out or "", self._errors.read()

@pytest.fixture(scope="session")
def guest_image() -> None:
    from vmigrate.lab.image import build_image

    build_image()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_image: None) -> Iterator[Lab]:
    from vmigrate.lab.net import LabSpec, lab_down, lab_up

    home = tmp_path_factory.mktemp("vmhome")
    name = "e" + secrets.token_hex(2)
    try:
        inv = lab_up(LabSpec(name=name, hosts=2, link_rate="1gbit"), home)
        yield Lab(home, name, inv)
    finally:
        lab_down(home, name)
