"""Build a :class:`Host` from its inventory entry."""

from __future__ import annotations

from vmigrate.config import HostConfig
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
