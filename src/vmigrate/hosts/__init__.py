"""How a host is reached: the controller's own machine, or any machine over SSH.

A host needs only sshd, QEMU and this package: there is no agent daemon.
"""

from __future__ import annotations

from vmigrate.hosts._base import CommandResult, Host, HostProcess, quote_argv
from vmigrate.hosts._local import LocalHost
from vmigrate.hosts._open import HostPool, known_hosts_path, open_host
from vmigrate.hosts._ssh import (
    SSHHost,
    fetch_host_key,
    fingerprint,
    known_keys,
    record_host_key,
)

__all__ = ["CommandResult", "Host", "HostPool", "HostProcess", "LocalHost", "SSHHost",
           "fetch_host_key", "fingerprint", "known_hosts_path", "known_keys", "open_host",
           "quote_argv", "record_host_key"]
