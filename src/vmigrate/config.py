"""The inventory (``vmigrate.toml``) and where vmigrate keeps its state.

Lookup order for the inventory: the ``--config`` option, then the
``VMIGRATE_CONFIG`` environment variable, then ``$VMIGRATE_HOME/vmigrate.toml``.
``VMIGRATE_HOME`` defaults to ``~/.local/state/vmigrate``.

Example::

    [hosts.h1]
    address = "10.240.1.11"        # where the controller reaches sshd
    user = "root"
    key = "/root/.ssh/id_ed25519"
    data_dir = "/var/lib/vmigrate"  # pidfiles, QMP sockets, console logs
    migration_address = "10.241.1.11"
    vm_bridge = "br-vm"
    [hosts.h1.pools]
    local = "/var/lib/vmigrate/images"
    shared = "/srv/shared"

A host with ``transport = "local"`` is the controller's own machine.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmigrate.errors import ConfigError, NotFoundError

CONFIG_ENV = "VMIGRATE_CONFIG"
HOME_ENV = "VMIGRATE_HOME"
CONFIG_NAME = "vmigrate.toml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostConfig(_Model):
    """One hypervisor host of the inventory."""

    name: str = ""
    transport: Literal["ssh", "local"] = "ssh"
    address: str = "127.0.0.1"
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    key: Path | None = None
    known_hosts: Path | None = None
    data_dir: Path
    migration_address: str | None = None
    vm_bridge: str | None = None
    pools: dict[str, Path] = Field(default_factory=dict)
    qemu_binary: str = "qemu-system-x86_64"
    #: how to run this package on the host (disk transfers run it there)
    vmigrate_command: list[str] = Field(default_factory=lambda: ["vmigrate"])
    accel: Literal["kvm", "tcg"] = "kvm"
    #: x509 credentials for QEMU's TLS migration (ca-cert.pem, server-*.pem, client-*.pem);
    #: default ``<data_dir>/tls``
    tls_dir: Path | None = None

    @property
    def tls_path(self) -> Path:
        return self.tls_dir if self.tls_dir is not None else self.data_dir / "tls"

    @field_validator("migration_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


class LabConfig(_Model):
    """What ``vmigrate lab up`` knows about the lab it built."""

    name: str
    dir: Path
    vm_network: str
    probe_netns: str
    gateway: str | None = None


class Inventory(_Model):
    """The parsed inventory file."""

    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    lab: LabConfig | None = None
    #: user convergence policies, ``[policies.NAME]`` tables; validated by vmigrate.plan.policy
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: the decision matrix's settings, ``[planning]``; validated by vmigrate.plan.decide
    planning: dict[str, Any] = Field(default_factory=dict)
    #: workload tiers, ``[tiers.NAME]``; validated by vmigrate.plan.decide
    tiers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    path: Path | None = None

    def host(self, name: str) -> HostConfig:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise NotFoundError(f"unknown host {name!r} (known hosts: {known})") from None


def state_home() -> Path:
    """The state directory: ``$VMIGRATE_HOME`` or ``~/.local/state/vmigrate``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    return Path.home() / ".local" / "state" / "vmigrate"


def config_path(explicit: Path | None = None) -> Path:
    """Where the inventory is read from, by the documented lookup order."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return state_home() / CONFIG_NAME


def parse_inventory(text: str, source: str = "<string>") -> Inventory:
    """Parse inventory TOML. Raises :class:`ConfigError` with the offending field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    hosts = raw.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{source}: [hosts] must be a table of host tables")
    for name, host in hosts.items():
        if isinstance(host, dict):
            host.setdefault("name", name)
    try:
        return Inventory.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']}") from exc


def load_inventory(explicit: Path | None = None, *, required: bool = True) -> Inventory:
    """Read the inventory by the lookup order; an absent file is an empty inventory
    unless ``required``."""
    path = config_path(explicit)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"no inventory at {path}: pass --config, set {CONFIG_ENV}, "
                "or run 'vmigrate lab up' to create a lab inventory"
            ) from None
        return Inventory(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read inventory {path}: {exc}") from exc
    inv = parse_inventory(text, str(path))
    return inv.model_copy(update={"path": path})


def _toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_inventory(inv: Inventory) -> str:
    """Render an inventory as TOML that :func:`parse_inventory` reads back."""
    lines: list[str] = []
    if inv.lab is not None:
        lines.append("[lab]")
        for key, value in inv.lab.model_dump(exclude_none=True).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    for name, host in inv.hosts.items():
        lines.append(f"[hosts.{name}]")
        data = host.model_dump(exclude_none=True, exclude={"name", "pools"})
        for key, value in data.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if host.pools:
            lines.append(f"[hosts.{name}.pools]")
            for pool, path in host.pools.items():
                lines.append(f"{pool} = {_toml_value(path)}")
        lines.append("")
    if inv.planning:
        lines.append("[planning]")
        for key, value in inv.planning.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    for section, tables in (("policies", inv.policies), ("tiers", inv.tiers)):
        for name, table in tables.items():
            lines.append(f"[{section}.{name}]")
            for key, value in table.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)
