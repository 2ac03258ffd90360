"""Real x509 credentials for the fake hosts, from one CA per test process.

RSA keys take tens of milliseconds to make: each host's credentials are issued
once per name and addresses and reused by every fake cluster of the process.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from vmigrate import pki
from vmigrate.errors import NotFoundError


@functools.cache
def ca_dir() -> Path:
    """The process's fake fleet CA (removed at exit)."""
    d = Path(tempfile.mkdtemp(prefix="vmigrate-fake-pki-"))
    atexit.register(shutil.rmtree, d, True)
    pki.create_ca(d / "ca", name="vmigrate fake fleet CA")
    return d / "ca"


@functools.cache
def _issued(host: str, addresses: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    return tuple(pki.host_credentials(ca_dir(), host, list(addresses)).items())


def credentials(host: str, addresses: tuple[str, ...]) -> dict[str, bytes]:
    """The five files of QEMU's tls-creds-x509 for ``host``, naming ``addresses``."""
    return dict(_issued(host, addresses))


def read(files: dict[str, object], path: str) -> bytes:
    """A credential file's bytes from a fake host's ``files`` (NotFoundError if absent)."""
    image = files.get(path)
    if image is None:
        raise NotFoundError(path)
    return image.read(0, image.size)  # type: ignore[attr-defined,no-any-return]
