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

Every field has a type and an allowed form (:mod:`vmigrate.validate`), checked when
the file is read, before anything runs: host, pool and lab names; ``address`` an IP
address or a DNS name; ``user`` a user name; every path absolute, normalised and free of
whitespace, quotes and shell metacharacters; ``vm_bridge`` an interface name;
``qemu_binary`` a command name or an absolute path. A wrong value is a
:class:`~vmigrate.errors.ConfigError` naming the field (exit status 2). The file must be
UTF-8.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmigrate import validate
from vmigrate.errors import ConfigError, NotFoundError

CONFIG_ENV = "VMIGRATE_CONFIG"
HOME_ENV = "VMIGRATE_HOME"
CONFIG_NAME = "vmigrate.toml"
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
#: a CPU model with features on or off (parsed in full by vmigrate.qemu.cpu.parse_cpu)
_CPU = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(,[+-]?[a-z0-9][a-z0-9_.-]{0,63}"
                  r"(=on|=off)?){0,64}")


def _check_cpu(value: str | None) -> str | None:
    """``value`` if it has the form of a CPU model (``MODEL[,+FEATURE|-FEATURE ...]``)."""
    if value is not None and not _CPU.fullmatch(value):
        raise ValueError(f"not a CPU model (MODEL[,+FEATURE|-FEATURE ...]): {value[:70]!r}")
    return value


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
    #: OpenSSH known_hosts file with this host's key (default: $VMIGRATE_HOME/known_hosts,
    #: which 'vmigrate host trust' writes); never ~/.ssh/known_hosts or ~/.ssh/config
    known_hosts: Path | None = None
    #: the host key's pinned fingerprint (``SHA256:...``, as ``ssh-keygen -lf`` prints
    #: it); when set, it alone decides (known_hosts is not read for this host)
    host_key: str | None = None
    data_dir: Path
    migration_address: str | None = None
    vm_bridge: str | None = None
    pools: dict[str, Path] = Field(default_factory=dict)
    #: directories (besides the pools) a disk transfer may write into on this host;
    #: the transfer receiver refuses any other target
    transfer_dirs: list[Path] = Field(default_factory=list)
    qemu_binary: str = "qemu-system-x86_64"
    #: how to run this package on the host (disk transfers run it there)
    vmigrate_command: list[str] = Field(default_factory=lambda: ["vmigrate"])
    accel: Literal["kvm", "tcg"] = "kvm"
    #: x509 credentials for QEMU's TLS migration (ca-cert.pem, server-*.pem, client-*.pem);
    #: default ``<data_dir>/tls``
    tls_dir: Path | None = None
    #: the CPU model of VMs created on this host when ``vm create`` names none (default:
    #: ``[defaults] cpu``, else x86-64-v2-AES); ``MODEL[,+FEATURE|-FEATURE ...]``
    vm_cpu: str | None = None
    #: hosts with the same ``cpu_group`` are declared identical (CPU, microcode, QEMU):
    #: only there may a VM use ``--cpu host`` (the host's CPU passed through)
    cpu_group: str | None = None
    #: the most a guest may get of this host's CPU: a CPU model (``Nehalem``) whose
    #: features bound what the host is taken to offer (an older host, or a fleet kept to
    #: one baseline); live and online migrations here refuse guests that need more
    cpu_limit: str | None = None

    @field_validator("vm_cpu", "cpu_limit")
    @classmethod
    def _cpu(cls, value: str | None) -> str | None:
        return _check_cpu(value)

    @field_validator("cpu_group")
    @classmethod
    def _cpu_group(cls, value: str | None) -> str | None:
        return None if value is None else validate.check_name(value, "cpu_group")

    @property
    def tls_path(self) -> Path:
        return self.tls_dir if self.tls_dir is not None else self.data_dir / "tls"

    @field_validator("host_key")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is not None and not _FINGERPRINT.fullmatch(value):
            raise ValueError("a host key fingerprint is 'SHA256:' and 43 base64 characters "
                             "(as 'ssh-keygen -lf' prints it)")
        return value

    @field_validator("migration_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    # -- the allowed forms of the other fields (vmigrate.validate) --

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return value if value == "" else validate.check_name(value, "host name")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return validate.check_address(value)

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"a port is a whole number from 1 to 65535, got {value!r:.40}")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return validate.check_user(value)

    @field_validator("key", "known_hosts", "data_dir", "tls_dir", check_fields=False)
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is not None:
            validate.check_path(str(value))
        return value

    @field_validator("transfer_dirs", check_fields=False)
    @classmethod
    def _paths(cls, value: list[Path]) -> list[Path]:
        for path in value:
            validate.check_path(str(path))
        return value

    @field_validator("pools")
    @classmethod
    def _pools(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            validate.check_name(name, "pool name")
            validate.check_path(str(path), f"pool {name}")
        return value

    @field_validator("vm_bridge")
    @classmethod
    def _bridge(cls, value: str | None) -> str | None:
        return None if value is None else validate.check_ifname(value, "bridge name")

    @field_validator("qemu_binary")
    @classmethod
    def _qemu(cls, value: str) -> str:
        return validate.check_command(value, "qemu_binary")

    @field_validator("vmigrate_command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("vmigrate_command needs at least the command")
        validate.check_command(value[0], "vmigrate_command's command")
        for word in value[1:]:
            validate.check_word(word, "a vmigrate_command argument")
        return value


class LabConfig(_Model):
    """What ``vmigrate lab up`` knows about the lab it built."""

    name: str
    dir: Path
    vm_network: str
    probe_netns: str
    gateway: str | None = None

    @field_validator("name", "probe_netns")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate.check_name(value)

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: Path) -> Path:
        validate.check_path(str(value), "lab dir")
        return value

    @field_validator("vm_network")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            ipaddress.ip_network(value)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {value!r:.60}") from exc
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str | None) -> str | None:
        return None if value is None else validate.check_ip(value)


class Defaults(_Model):
    """``[defaults]``: fleet-wide settings a host or a request may override."""

    #: the CPU model of new VMs (see :class:`HostConfig`'s ``vm_cpu``); None:
    #: x86-64-v2-AES (:data:`vmigrate.qemu.cpu.DEFAULT_CPU`)
    cpu: str | None = None

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str | None) -> str | None:
        return _check_cpu(value)


class Inventory(_Model):
    """The parsed inventory file."""

    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    lab: LabConfig | None = None
    #: user convergence policies, ``[policies.NAME]`` tables; validated by vmigrate.plan.policy
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: the decision matrix's settings, ``[planning]``; validated by vmigrate.plan.decide
    planning: dict[str, Any] = Field(default_factory=dict)
    #: workload tiers, ``[tiers.NAME]``; validated by vmigrate.plan.decide
    tiers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    path: Path | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: dict[str, HostConfig]) -> dict[str, HostConfig]:
        for name, host in value.items():
            validate.check_name(name, "host name")
            if host.name and host.name != name:
                raise ValueError(f"host {name} names itself {host.name!r}")
        return value

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
    except RecursionError as exc:  # tomllib recurses into nested arrays and tables
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from exc
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
        where = validate.printable(".".join(str(p) for p in first["loc"]))
        raise ConfigError(f"{source}: {where}: {validate.printable(str(first['msg']))}"
                          ) from exc


def load_inventory(explicit: Path | None = None, *, required: bool = True) -> Inventory:
    """Read the inventory by the lookup order; an absent file is an empty inventory
    unless ``required``."""
    path = config_path(explicit)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"no inventory at {path}: pass --config, set {CONFIG_ENV}, "
                "or run 'vmigrate lab up' to create a lab inventory"
            ) from None
        return Inventory(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read inventory {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start + 1}, line {line}); "
                          "the inventory must be UTF-8") from exc
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
    defaults = inv.defaults.model_dump(exclude_none=True)
    if defaults:
        lines.append("[defaults]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in defaults.items()]
        lines.append("")
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
