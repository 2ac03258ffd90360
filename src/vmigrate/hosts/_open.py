"""Build a :class:`Host` from its inventory entry."""

from __future__ import annotations

import contextlib
from pathlib import Path

from vmigrate.config import HostConfig, Inventory, state_home
from vmigrate.hosts._base import Host
from vmigrate.hosts._local import LocalHost
from vmigrate.hosts._ssh import SSHHost

#: vmigrate's own known_hosts (under $VMIGRATE_HOME) for hosts whose inventory entry
#: names none; 'vmigrate host trust' writes it
KNOWN_HOSTS = "known_hosts"


def known_hosts_path(cfg: HostConfig) -> Path:
    """Where ``cfg``'s SSH host key is recorded: its ``known_hosts``, else
    ``$VMIGRATE_HOME/known_hosts`` (never the user's ``~/.ssh/known_hosts``)."""
    return cfg.known_hosts if cfg.known_hosts is not None else state_home() / KNOWN_HOSTS


def open_host(cfg: HostConfig) -> Host:
    """A host object for ``cfg``; SSH connects lazily on first use, and only to a host
    whose key is pinned (``host_key``) or recorded (:func:`known_hosts_path`)."""
    if cfg.transport == "local":
        return LocalHost(cfg.name)
    return SSHHost(
        cfg.name,
        cfg.address,
        port=cfg.port,
        user=cfg.user,
        key=cfg.key,
        known_hosts=known_hosts_path(cfg),
        host_key=cfg.host_key,
    )


class HostPool:
    """Hosts of an inventory opened on first use and closed together (``aclose``):
    what a service holds for the length of one command."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._hosts: dict[str, Host] = {}

    def get(self, name: str) -> tuple[Host, HostConfig]:
        """The host named ``name`` and its entry (:class:`NotFoundError` if unknown)."""
        cfg = self.inventory.host(name)
        if name not in self._hosts:
            self._hosts[name] = open_host(cfg)
        return self._hosts[name], cfg

    async def aclose(self) -> None:
        """Close every session; a host that fails to close does not keep the others open."""
        for host in self._hosts.values():
            with contextlib.suppress(Exception):
                await host.close()
        self._hosts.clear()
