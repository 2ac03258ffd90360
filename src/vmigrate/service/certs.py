"""TLS credentials for inventory hosts: issue from the local CA, install over SSH.

The CA and the record of what was issued live in a local PKI directory (see
:mod:`vmigrate.pki`); a host's credentials go into its ``tls_path`` (default
``<data_dir>/tls``), which is the ``dir`` of QEMU's ``tls-creds-x509`` object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmigrate import pki
from vmigrate.config import HostConfig, Inventory, state_home
from vmigrate.errors import ConfigError
from vmigrate.hosts import Host, open_host

#: the lab keeps its CA in ``<lab dir>/pki`` (see :func:`vmigrate.lab.net.lab_up`)
LAB_PKI = "pki"

_INSTALL = (
    'umask 077 && cat > "$1.tmp" && chmod "$2" "$1.tmp" && mv -f "$1.tmp" "$1"'
)


def default_pki_dir(inventory: Inventory | None) -> Path:
    """The lab's CA (``<lab dir>/pki``) for a lab inventory, else ``$VMIGRATE_HOME/pki``."""
    if inventory is not None and inventory.lab is not None:
        return inventory.lab.dir / LAB_PKI
    return state_home() / "pki"


def host_addresses(cfg: HostConfig) -> list[str]:
    """The addresses a host's certificate names: its SSH address and its migration
    address (duplicates dropped)."""
    out = [cfg.address]
    if cfg.migration_address and cfg.migration_address not in out:
        out.append(cfg.migration_address)
    return out


async def install(host: Host, tls_dir: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``tls_dir`` on ``host`` (created 0700 if missing); each
    file is replaced atomically, private keys 0600, certificates 0644, and no key
    is ever readable by others, even while being written.

    Raises :class:`~vmigrate.errors.HostError` (unreachable, or a command failed);
    files already written before the failure stay (each one complete)."""
    await host.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1"', "sh", tls_dir])
    for name, data in files.items():
        if not name or "/" in name:
            raise ValueError(f"not a plain file name: {name!r}")
        mode = "600" if pki.is_secret(name) else "644"
        await host.run(["sh", "-c", _INSTALL, "sh", f"{tls_dir.rstrip('/')}/{name}", mode],
                       stdin=data)


@dataclass(frozen=True)
class Issued:
    """The credentials issued to one host, and where they went."""

    host: str
    destination: str  # "h1:/var/lib/vmigrate/tls" or a local directory
    pushed: bool
    record: Path
    server: pki.CertInfo

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "destination": self.destination,
            "pushed": self.pushed,
            "record": str(self.record),
            "dns_names": list(self.server.dns_names),
            "ip_addresses": list(self.server.ip_addresses),
            "not_after": self.server.not_after.isoformat(),
        }


async def issue(inventory: Inventory, pki_dir: Path, names: Sequence[str], *,
                push: bool = True) -> list[Issued]:
    """Issue credentials to the inventory hosts ``names`` (SANs: host name, address,
    migration address). With ``push``, install them into each host's ``tls_path``
    over its transport and keep only the certificates in the local record;
    without, write all five files into the local record ``<pki_dir>/hosts/<host>``.

    Every host name is checked, and the CA loaded, before anything is issued.
    Hosts are done in order; on a failure, the hosts before it are done."""
    if not names:
        raise ConfigError("name at least one inventory host")
    cfgs = [inventory.host(n) for n in dict.fromkeys(names)]
    pki.ca_info(pki_dir)  # fail early without a usable CA
    done: list[Issued] = []
    for cfg in cfgs:
        files = pki.host_credentials(pki_dir, cfg.name, host_addresses(cfg))
        if push:
            host = open_host(cfg)
            try:
                await install(host, str(cfg.tls_path), files)
            finally:
                await host.close()
            record = pki.record_issued(pki_dir, cfg.name, files, keys=False)
            destination = f"{cfg.name}:{cfg.tls_path}"
        else:
            record = pki.record_issued(pki_dir, cfg.name, files, keys=True)
            destination = str(record)
        done.append(Issued(cfg.name, destination, push, record,
                           pki.cert_info(files[pki.SERVER_CERT])))
    return done


@dataclass(frozen=True)
class HostRecord:
    """What the local record says about one host's credentials."""

    host: str
    record: Path
    server: pki.CertInfo
    keys_local: bool  # False: the keys were pushed to the host and not kept here
    from_this_ca: bool
    #: the client certificate's DN as a destination's tls-authz allows it (None: no
    #: client certificate in the record)
    authz_dn: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "record": str(self.record),
            "subject": self.server.subject,
            "authz_dn": self.authz_dn,
            "dns_names": list(self.server.dns_names),
            "ip_addresses": list(self.server.ip_addresses),
            "not_after": self.server.not_after.isoformat(),
            "expired": self.server.expired(),
            "keys": "local" if self.keys_local else "pushed",
            "from_this_ca": self.from_this_ca,
        }


@dataclass(frozen=True)
class PkiStatus:
    """The CA of a PKI directory and the hosts it issued credentials to."""

    dir: Path
    ca: pki.CertInfo
    hosts: list[HostRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "ca": self.ca.as_dict(),
                "hosts": [h.as_dict() for h in self.hosts]}


def status(pki_dir: Path) -> PkiStatus:
    """Read the CA and the issued records (raises like :func:`vmigrate.pki.ca_info`)."""
    ca = pki.ca_info(pki_dir)
    ca_pem = (pki_dir / pki.CA_CERT).read_bytes()
    hosts: list[HostRecord] = []
    with contextlib.suppress(FileNotFoundError):
        for d in sorted((pki_dir / "hosts").iterdir()):
            cert = d / pki.SERVER_CERT
            if not cert.is_file():
                continue
            pem = cert.read_bytes()
            client = d / pki.CLIENT_CERT
            hosts.append(HostRecord(
                host=d.name, record=d, server=pki.cert_info(pem),
                keys_local=(d / pki.SERVER_KEY).is_file(),
                from_this_ca=pki.issued_by(pem, ca_pem),
                authz_dn=pki.x509_dn(client.read_bytes()) if client.is_file() else None,
            ))
    return PkiStatus(pki_dir, ca, hosts)


def days_left(info: pki.CertInfo) -> int:
    return (info.not_after - dt.datetime.now(dt.UTC)).days
