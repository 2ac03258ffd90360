"""The controller's Ed25519 audit key: it signs every record of the audit log.

Two files in the controller's state directory (``$VMIGRATE_HOME``):

``audit-ed25519.key``  the private key, PKCS#8 PEM, mode 0600, created at first use
``audit-ed25519.pub``  the public key, one line: ``ed25519 <base64 of the 32 raw bytes>``

The key's **fingerprint** is ``SHA256:`` followed by the unpadded base64 of the
SHA-256 of the 32 raw public key bytes (the shape of an SSH fingerprint, over the raw
key). Every signed record names it; ``vmigrate audit verify`` prints it, so an operator
can compare it with a copy kept elsewhere (the public key file can be copied anywhere and
given to ``audit verify --key``).

Creation is safe against several processes starting at once: the key is written to a
private temporary file and hard-linked to its final name, which fails if another process
got there first (its key is then used). A key file that exists but cannot be read or
parsed raises :class:`~vmigrate.errors.AuditUnreadableError`; nothing is replaced.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from vmigrate.errors import AuditUnreadableError, StoreError

PRIVATE_NAME = "audit-ed25519.key"
PUBLIC_NAME = "audit-ed25519.pub"
_PUBLIC_TAG = "ed25519"
#: bytes of an Ed25519 signature and of a raw public key
SIGNATURE_BYTES = 64
_RAW_KEY_BYTES = 32


def fingerprint_of(raw: bytes) -> str:
    """``SHA256:<unpadded base64>`` of the raw public key bytes."""
    digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` has the shape of a fingerprint (43 base64 characters)."""
    if not isinstance(value, str) or not value.startswith("SHA256:") or len(value) != 50:
        return False
    try:
        return len(base64.b64decode(value[7:] + "=", validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def decode_signature(value: object) -> bytes | None:
    """The 64 bytes of a base64 signature, or None if ``value`` is not one."""
    if not isinstance(value, str) or len(value) != 88:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == SIGNATURE_BYTES else None


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key that checks record signatures."""

    raw: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.raw)

    def text(self) -> str:
        """The public key file's line (with its newline)."""
        return f"{_PUBLIC_TAG} {base64.b64encode(self.raw).decode()}\n"

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def parse(cls, text: str, *, source: str = "public key") -> PublicKey:
        """A key from its file line (``ed25519 BASE64``); :class:`AuditUnreadableError`
        if it is not one."""
        parts = text.split()
        raw = b""
        if len(parts) == 2 and parts[0] == _PUBLIC_TAG:
            with contextlib.suppress(binascii.Error, ValueError):
                raw = base64.b64decode(parts[1], validate=True)
        if len(raw) != _RAW_KEY_BYTES:
            raise AuditUnreadableError(f"{source} is not an audit public key "
                                       f"('{_PUBLIC_TAG} <base64 of 32 bytes>')")
        return cls(raw)

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        """Read a public key file; :class:`AuditUnreadableError` if it cannot be read or
        is not a key."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditUnreadableError(f"cannot read the audit public key {path}: {exc}"
                                       ) from exc
        return cls.parse(text, source=str(path))


class SigningKey:
    """The controller's private key (see the module doc)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        self.public = PublicKey(raw)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign(self, data: bytes) -> str:
        """The base64 Ed25519 signature of ``data``."""
        return base64.b64encode(self._key.sign(data)).decode()

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())


def _read_private(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditUnreadableError(f"cannot read the audit signing key {path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditUnreadableError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditUnreadableError(f"{path} is not an Ed25519 key")
    return SigningKey(key)


def _write_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` unless it exists (then False): a temporary file of
    ``mode``, fsync'd, hard-linked to the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_signing_key(directory: Path, *, create: bool = True) -> SigningKey:
    """The controller's signing key in ``directory``, created there at first use
    (``create``), with its public key file next to it.

    Raises :class:`AuditUnreadableError` when a key file exists but cannot be read or
    parsed, or its public key file names another key (nothing is replaced then), and
    :class:`StoreError` when a new key cannot be written (nothing is left behind but
    what was complete) or, without ``create``, there is none.
    """
    private = directory / PRIVATE_NAME
    public = directory / PUBLIC_NAME
    if not private.exists():
        if not create:
            raise StoreError(f"there is no audit signing key in {directory}")
        key = SigningKey.generate()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not _write_exclusive(private, key.pem(), 0o600):
                key = _read_private(private)  # another process made it first
        except OSError as exc:
            raise StoreError(f"cannot create the audit signing key in {directory}: {exc}"
                             ) from exc
    else:
        key = _read_private(private)
    if public.exists():
        if PublicKey.load(public) != key.public:
            raise AuditUnreadableError(
                f"{public} does not match the signing key {private} ({key.fingerprint}): "
                "one of them was replaced; keep both as evidence and find out which")
    else:
        try:
            _write_exclusive(public, key.public.text().encode(), 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write the audit public key {public}: {exc}") from exc
    return key


def load_public_key(directory: Path) -> PublicKey | None:
    """The controller's public key from ``directory`` (its ``.pub`` file, else derived
    from the private key), or None when there is neither. Raises
    :class:`AuditUnreadableError` when a file exists but cannot be parsed, the ``.pub``
    file cannot be read, or both exist and name different keys (one was replaced). A
    private key this process may not read is not cross-checked."""
    public = directory / PUBLIC_NAME
    private = directory / PRIVATE_NAME
    signing: SigningKey | None = None
    if private.exists():
        try:
            private.open("rb").close()
        except OSError:
            if not public.exists():
                raise AuditUnreadableError(f"cannot read the audit signing key {private}, "
                                           f"and there is no {public}") from None
        else:
            signing = _read_private(private)
    if public.exists():
        key = PublicKey.load(public)
        if signing is not None and signing.public != key:
            raise AuditUnreadableError(
                f"{public} does not match the signing key {private} ({signing.fingerprint}): "
                "one of them was replaced; keep both as evidence and find out which")
        return key
    return signing.public if signing is not None else None
