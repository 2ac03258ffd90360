"""How a host is reached: the controller's own machine, or any machine over SSH.

A host needs only sshd, QEMU and this package: there is no agent daemon.
"""

from __future__ import annotations

from vmigrate.hosts._base import CommandResult, Host, HostProcess
from vmigrate.hosts._local import LocalHost
from vmigrate.hosts._open import HostPool, open_host
from vmigrate.hosts._ssh import SSHHost

__all__ = ["CommandResult", "Host", "HostPool", "HostProcess", "LocalHost", "SSHHost",
           "open_host"]
