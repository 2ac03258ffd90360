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
    # capacity and topology (fleets): all optional
    memory = "256G"                 # None: measured (/proc/meminfo) when needed
    cpus = 64                       # None: measured (nproc)
    reserve_memory = "16G"          # kept for the host itself; below memory
    state = "active"                # or "draining", "maintenance" (the declared state)
    uplink = "rack1-up"             # default "<host>-up"; hosts may share a link
    downlink = "rack1-down"         # default "<host>-down"
    max_migrations_in = 2           # 1..64
    max_migrations_out = 2
    [hosts.h1.pools]
    local = "/var/lib/vmigrate/images"
    shared = "/srv/shared"
    [hosts.h1.labels]
    rack = "r1"

    [links.rack1-up]
    capacity = "10gbit"             # None: measured by 'vmigrate assess'
    budget = 0.5                    # the share of capacity migrations may use

    [groups.db]
    vms = ["db-*"]                  # name patterns, as [tiers.X] vms
    placement = "apart"             # or "together"

A host with ``transport = "local"`` is the controller's own machine.

Every field has a type and an allowed form (:mod:`vmigrate.validate`), checked when
the file is read, before anything runs: host, pool and lab names; ``address`` an IP
address or a DNS name; ``user`` a user name; every path absolute, normalised and free of
whitespace, quotes and shell metacharacters; ``vm_bridge`` an interface name;
``qemu_binary`` a command name or an absolute path; ``memory`` and ``reserve_memory``
sizes (:func:`vmigrate.units.parse_size`), a link's ``capacity`` a rate with a unit
(:func:`vmigrate.units.parse_rate`: ``mbit`` and ``mbps`` are bits); label names and
values, link and group names are names. A wrong value is a
:class:`~vmigrate.errors.ConfigError` naming the field (exit status 2). The file must be
UTF-8.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vmigrate import validate
from vmigrate.errors import ConfigError, NotFoundError, SpecError
from vmigrate.units import parse_rate, parse_size

CONFIG_ENV = "VMIGRATE_CONFIG"
HOME_ENV = "VMIGRATE_HOME"
CONFIG_NAME = "vmigrate.toml"
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
#: a CPU model with features on or off (parsed in full by vmigrate.qemu.cpu.parse_cpu)
_CPU = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(,[+-]?[a-z0-9][a-z0-9_.-]{0,63}"
                  r"(=on|=off)?){0,64}")


#: a host's declared state: ``active`` takes VMs; ``draining`` takes none and is being
#: emptied; ``maintenance`` takes none and is out of service
HostState = Literal["active", "draining", "maintenance"]
HOST_STATES: tuple[HostState, ...] = ("active", "draining", "maintenance")
#: how a group's members are placed: ``together`` on one host (moved as one),
#: ``apart`` never two on one host
Placement = Literal["together", "apart"]
#: the share of a link's capacity migrations may use when ``[links.X]`` says nothing
DEFAULT_BUDGET = 0.5
#: concurrent migrations into / out of a host when the inventory says nothing
DEFAULT_MAX_MIGRATIONS = 2
MAX_MIGRATIONS = 64
#: a host's declared memory below this is a unit forgotten (``memory = "64"``: 64 bytes)
MIN_HOST_MEMORY = 64 << 20
#: a link's declared capacity below this (1 mbit/s) is a unit forgotten
MIN_LINK_CAPACITY = 125_000
#: link names: a name, long enough for the default ``<host>-down``
_LINK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")


def _check_link_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _LINK_RE.fullmatch(value):
        raise ValueError(f"{what} must be 1-80 characters of letters, digits, '.', '_' or "
                         f"'-', starting with a letter or digit; got {str(value)[:60]!r}")
    return value


def _size(value: object, what: str, *, minimum: int = 0) -> str | None:
    """A size as written (``"64G"``; a TOML integer is bytes), checked with
    :func:`parse_size`; ``minimum`` catches a forgotten unit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{what} is a size such as \"64G\", got {value!r:.40}")
    text = str(value)
    try:
        size = parse_size(text, what=what)
    except SpecError as exc:
        raise ValueError(str(exc)) from exc
    if size < minimum:
        raise ValueError(f"{what} {text!r} is {size} bytes, below {minimum >> 20} MiB: "
                         "write a unit, e.g. \"64G\"")
    return text


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

    # -- capacity and topology (fleets) --

    #: the host's memory, a size (``"256G"``); None: unknown, measured (``MemTotal``)
    #: when needed. See :meth:`Inventory.host_capacity` for bytes.
    memory: str | None = None
    #: the host's CPUs (logical, as ``nproc`` counts); None: unknown, measured
    cpus: int | None = None
    #: memory kept for the host itself (its kernel, QEMU's overhead, page cache): VMs
    #: are placed in ``memory - reserve_memory``; below ``memory`` when both are set
    reserve_memory: str = "0"
    #: the operator's declared state; a state set at run time (``vmigrate host
    #: maintenance``/``activate``, kept in the store) overrides it
    state: HostState = "active"
    #: free-form name = value labels (``rack = "r1"``), for selecting hosts
    labels: dict[str, str] = Field(default_factory=dict)
    #: the links the host's migration traffic leaves and arrives by (default
    #: ``<host>-up``, ``<host>-down``; hosts behind one switch port may share one);
    #: a link may have a ``[links.NAME]`` entry, else its capacity is measured
    uplink: str | None = None
    downlink: str | None = None
    #: migrations running into / out of this host at the same time, 1..64
    max_migrations_in: int = Field(default=DEFAULT_MAX_MIGRATIONS, ge=1, le=MAX_MIGRATIONS)
    max_migrations_out: int = Field(default=DEFAULT_MAX_MIGRATIONS, ge=1, le=MAX_MIGRATIONS)

    @model_validator(mode="before")
    @classmethod
    def _default_links(cls, data: Any) -> Any:
        """``uplink``/``downlink`` default to ``<name>-up``/``<name>-down`` once the
        host's name is known (:class:`Inventory` fills them for a host built without
        one)."""
        if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
            name = data["name"]
            data = {**data}
            if data.get("uplink") is None:
                data["uplink"] = f"{name}-up"
            if data.get("downlink") is None:
                data["downlink"] = f"{name}-down"
        return data

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: object) -> str | None:
        return _size(value, "memory", minimum=MIN_HOST_MEMORY)

    @field_validator("reserve_memory", mode="before")
    @classmethod
    def _reserve(cls, value: object) -> str | None:
        if value is None:
            raise ValueError("reserve_memory is a size such as \"8G\" (default \"0\")")
        return _size(value, "reserve_memory")

    @field_validator("cpus", "max_migrations_in", "max_migrations_out", mode="before")
    @classmethod
    def _whole(cls, value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"a whole number is needed, got {value!r:.40}")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65536:
            raise ValueError(f"cpus is a whole number from 1 to 65536, got {value}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError("labels is a table of name = value")
        labels: dict[str, str] = {}
        for name, label in value.items():
            validate.check_name(name, "a label name")
            if isinstance(label, int) and not isinstance(label, bool):
                label = str(label)  # rack = 3
            if not isinstance(label, str):
                raise ValueError(f"label {name}: a value is a name or a whole number, got "
                                 f"{label!r:.40}")
            labels[name] = validate.check_name(label, f"label {name}'s value")
        return labels

    @field_validator("uplink", "downlink")
    @classmethod
    def _link(cls, value: str | None) -> str | None:
        return None if value is None else _check_link_name(value, "a link name")

    @model_validator(mode="after")
    def _reserve_below_memory(self) -> HostConfig:
        if self.memory is not None and self.reserve_bytes >= (self.memory_bytes or 0):
            raise ValueError(f"reserve_memory ({self.reserve_memory}) must be below memory "
                             f"({self.memory}): nothing would be left for VMs")
        return self

    @property
    def memory_bytes(self) -> int | None:
        """``memory`` in bytes; None when not declared."""
        return None if self.memory is None else parse_size(self.memory, what="memory")

    @property
    def reserve_bytes(self) -> int:
        """``reserve_memory`` in bytes."""
        return parse_size(self.reserve_memory, what="reserve_memory")

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


class LinkConfig(_Model):
    """``[links.NAME]``: a network link hosts' migration traffic crosses (a host's
    ``uplink`` or ``downlink``; several hosts may share one)."""

    #: what the link carries, a rate with a unit (``"10gbit"``, ``"200mbit"``,
    #: ``"100M"`` = MiB/s: :func:`vmigrate.units.parse_rate`); None: not declared,
    #: measured by ``vmigrate assess``'s link probe
    capacity: str | None = None
    #: the share of ``capacity`` migrations may use, above 0 and at most 1. Default
    #: 0.5: the link also carries the tenants' traffic (storage, replication,
    #: clients), and a migration that fills a link slows every guest behind it, so
    #: half is kept for them unless the operator knows better (a dedicated migration
    #: network: 1.0)
    budget: float = Field(default=DEFAULT_BUDGET, gt=0, le=1, allow_inf_nan=False)

    @field_validator("capacity", mode="before")
    @classmethod
    def _capacity(cls, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not re.search(r"[A-Za-z]", value):
            raise ValueError(f"capacity is a rate with a unit such as \"1gbit\", "
                             f"\"200mbit\" or \"100M\" (MiB/s), got {value!r:.40}")
        try:
            rate = parse_rate(value, what="capacity")
        except SpecError as exc:
            raise ValueError(str(exc)) from exc
        if rate < MIN_LINK_CAPACITY:
            raise ValueError(f"capacity {value!r} is below 1mbit: not a migration link")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"budget is a share above 0 and at most 1 (0.5), got {value!r:.40}")
        return value

    @property
    def capacity_bps(self) -> int | None:
        """``capacity`` in bytes per second; None when not declared."""
        return None if self.capacity is None else parse_rate(self.capacity, what="capacity")


class GroupConfig(_Model):
    """``[groups.NAME]``: VMs placed by a rule. ``together``: the members share a host
    and move together; ``apart``: never two members on one host (anti-affinity)."""

    #: name patterns of the members (fnmatch globs, as ``[tiers.X] vms``)
    vms: tuple[str, ...] = Field(min_length=1)
    placement: Placement

    @field_validator("vms")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for glob in value:
            validate.check_glob(glob, "a vms pattern")
        return value

    def matches(self, vm: str) -> bool:
        return validate.name_matches(vm, self.vms)


@dataclass(frozen=True)
class HostCapacity:
    """What a host offers VMs, as the inventory declares it (None: not declared; the
    fleet code measures it, :mod:`vmigrate.service.capacity`)."""

    host: str
    #: bytes
    memory: int | None
    #: bytes kept for the host
    reserve_memory: int
    cpus: int | None
    max_migrations_in: int
    max_migrations_out: int

    @property
    def vm_memory(self) -> int | None:
        """Bytes VMs may use: ``memory - reserve_memory`` (None when memory is unknown)."""
        return None if self.memory is None else self.memory - self.reserve_memory


@dataclass(frozen=True)
class Link:
    """A link as the fleet code uses it."""

    name: str
    #: bytes per second; None: not declared (measure it)
    capacity: int | None
    #: the share of capacity migrations may use (0 < budget <= 1)
    budget: float
    #: a ``[links.NAME]`` entry exists
    declared: bool

    @property
    def migration_rate(self) -> float | None:
        """Bytes per second migrations may use: ``capacity * budget`` (None: unknown)."""
        return None if self.capacity is None else self.capacity * self.budget


@dataclass(frozen=True)
class VmGroups:
    """The groups a VM belongs to: at most one ``together`` group, any ``apart``."""

    together: str | None = None
    apart: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every group name, the together group first."""
        return ((self.together,) if self.together else ()) + self.apart


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
    #: links hosts' uplink/downlink name, ``[links.NAME]``
    links: dict[str, LinkConfig] = Field(default_factory=dict)
    #: placement groups, ``[groups.NAME]``
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    path: Path | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: dict[str, HostConfig]) -> dict[str, HostConfig]:
        hosts: dict[str, HostConfig] = {}
        for name, host in value.items():
            validate.check_name(name, "host name")
            if host.name and host.name != name:
                raise ValueError(f"host {name} names itself {host.name!r}")
            if host.uplink is None or host.downlink is None:  # built without a name
                host = host.model_copy(update={"uplink": host.uplink or f"{name}-up",
                                               "downlink": host.downlink or f"{name}-down"})
            hosts[name] = host
        return hosts

    @field_validator("links")
    @classmethod
    def _links(cls, value: dict[str, LinkConfig]) -> dict[str, LinkConfig]:
        for name in value:
            _check_link_name(name, "a link name")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: dict[str, GroupConfig]) -> dict[str, GroupConfig]:
        for name in value:
            validate.check_name(name, "a group name")
        return value

    @model_validator(mode="after")
    def _links_used(self) -> Inventory:
        """A ``[links.NAME]`` no host's uplink or downlink names is an error: it would
        change nothing, so it is a typo (``[links.h1-upp]``) that would leave the real
        link at the default budget and a measured capacity. The other way round is
        fine: a link without an entry has its capacity measured."""
        used = self.link_names()
        for name in self.links:
            if name not in used:
                near = difflib.get_close_matches(name, sorted(used), n=1)
                hint = f"did you mean {near[0]}?" if near else (
                    "hosts use: " + (", ".join(sorted(used)[:8]) or "none"))
                raise ValueError(f"links.{name}: no host's uplink or downlink names this "
                                 f"link ({hint}); remove it or name it in a host")
        return self

    def host(self, name: str) -> HostConfig:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise NotFoundError(f"unknown host {name!r} (known hosts: {known})") from None

    # -- capacity and topology (fleets) --

    def host_links(self, name: str) -> tuple[str, str]:
        """Host ``name``'s (uplink, downlink) names."""
        cfg = self.host(name)
        return cfg.uplink or f"{name}-up", cfg.downlink or f"{name}-down"

    def link_names(self) -> set[str]:
        """Every link a host's uplink or downlink names."""
        return {link for host in self.hosts for link in self.host_links(host)}

    def host_capacity(self, name: str) -> HostCapacity:
        """What host ``name`` declares it offers, in bytes and CPUs
        (:class:`NotFoundError` for an unknown host)."""
        cfg = self.host(name)
        return HostCapacity(host=name, memory=cfg.memory_bytes, reserve_memory=cfg.reserve_bytes,
                            cpus=cfg.cpus, max_migrations_in=cfg.max_migrations_in,
                            max_migrations_out=cfg.max_migrations_out)

    def link(self, name: str) -> Link:
        """Link ``name`` with its capacity in bytes/s: its ``[links.NAME]`` entry, else
        capacity unknown and the default budget. :class:`NotFoundError` for a name no
        host uses."""
        entry = self.links.get(name)
        if entry is None:
            used = self.link_names()
            if name not in used:
                known = ", ".join(sorted(used)[:20]) or "none"
                raise NotFoundError(f"no host uses a link {name!r} (links: {known})")
            return Link(name=name, capacity=None, budget=DEFAULT_BUDGET, declared=False)
        return Link(name=name, capacity=entry.capacity_bps, budget=entry.budget,
                    declared=True)

    def declared_state(self, name: str) -> HostState:
        """Host ``name``'s state as the inventory declares it (the store may override
        it: :meth:`vmigrate.store.Store.effective_host_state`)."""
        return self.host(name).state


def groups_for(inventory: Inventory, vm: str) -> VmGroups:
    """The groups VM ``vm`` belongs to (its name matches one of their ``vms``
    patterns), in inventory order. A VM in two ``together`` groups cannot move with
    both: :class:`ConfigError` naming them."""
    together = [name for name, g in inventory.groups.items()
                if g.placement == "together" and g.matches(vm)]
    if len(together) > 1:
        raise ConfigError(f"VM {vm} is in {len(together)} 'together' groups "
                          f"({', '.join(together)}): a VM moves with one group only; "
                          "change their vms patterns in the inventory")
    apart = tuple(name for name, g in inventory.groups.items()
                  if g.placement == "apart" and g.matches(vm))
    return VmGroups(together=together[0] if together else None, apart=apart)


def group_members(inventory: Inventory, group: str, vms: list[str]) -> list[str]:
    """Which of ``vms`` belong to group ``group`` (:class:`NotFoundError` if unknown)."""
    try:
        entry = inventory.groups[group]
    except KeyError:
        known = ", ".join(sorted(inventory.groups)) or "none"
        raise NotFoundError(f"unknown group {group!r} (groups: {known})") from None
    return [vm for vm in vms if entry.matches(vm)]


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
        msg = validate.printable(str(first["msg"]).removeprefix("Value error, "))
        raise ConfigError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}"
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
    if isinstance(value, dict):  # keys quoted: a '.' in a bare key would nest
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
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
        # the capacity and topology fields only when they differ from their defaults
        defaults = {"reserve_memory": "0", "state": "active", "labels": {},
                    "uplink": f"{name}-up", "downlink": f"{name}-down",
                    "max_migrations_in": DEFAULT_MAX_MIGRATIONS,
                    "max_migrations_out": DEFAULT_MAX_MIGRATIONS}
        same = {key for key, value in defaults.items() if getattr(host, key) == value}
        data = host.model_dump(exclude_none=True, exclude={"name", "pools"} | same)
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
    for section, entries in (("links", inv.links), ("groups", inv.groups)):
        for name, entry in entries.items():
            lines.append(f"[{section}.{_toml_value(name)}]")
            for key, value in entry.model_dump(exclude_none=True).items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)
