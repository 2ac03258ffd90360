"""Build a :class:`Host` from its inventory entry."""

from __future__ import annotations

import contextlib

from vmigrate.config import HostConfig, Inventory
from vmigrate.hosts._base import Host
from vmigrate.hosts._local import LocalHost
from vmigrate.hosts._ssh import SSHHost


def open_host(cfg: HostConfig) -> Host:
    """A host object for ``cfg``; SSH connects lazily on first use."""
    if cfg.transport == "local":
        return LocalHost(cfg.name)
    return SSHHost(
        cfg.name,
        cfg.address,
        port=cfg.port,
        user=cfg.user,
        key=cfg.key,
        known_hosts=cfg.known_hosts,
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
