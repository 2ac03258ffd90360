"""x509 credentials for QEMU's TLS migration (``tls-creds-x509``).

QEMU's ``tls-creds-x509`` object reads PEM files from one directory ``dir``:
``ca-cert.pem`` always; ``server-cert.pem`` and ``server-key.pem`` for
``endpoint=server`` (the migration destination); ``client-cert.pem`` and
``client-key.pem`` for ``endpoint=client`` (the source, and required when the
server sets ``verify-peer``). :func:`host_credentials` returns exactly those
five files for one host, so every host can be either end of a migration.

What QEMU 7.2 / GnuTLS 3.7 check (``crypto/tlscredsx509.c`` sanity check, then
the handshake) and what is issued here accordingly:

* CA: X.509 v3 ``basicConstraints CA:TRUE`` (critical; QEMU refuses a CA
  without it) and ``keyUsage keyCertSign, cRLSign`` (critical).
* host certificates: ``basicConstraints CA:FALSE``; ``keyUsage
  digitalSignature, keyEncipherment`` (critical; QEMU 7.2 insists on *both*
  when the extension is critical, hence RSA keys, for which keyEncipherment
  is meaningful); ``extendedKeyUsage serverAuth`` resp. ``clientAuth``;
  ``subjectAltName`` DNS=host name plus every address (IP or DNS): the client
  checks the server certificate against the host in the migration URI (or the
  ``tls-hostname`` parameter).
* SHA-256 signatures, RSA 2048; validity starts 5 minutes in the past (clock
  skew between hosts), 1 year for hosts (never past the CA), 10 years for the CA.

The CA lives in a directory: ``ca-cert.pem`` and ``ca-key.pem`` (0600). A
record of what was issued (public certificates only, plus keys when they were
written locally) is kept under ``<ca dir>/hosts/<host>/``.

Errors: a missing CA is :class:`~vmigrate.errors.EnvironmentError_` (run
``vmigrate certs init``); unreadable, inconsistent or expired CA files and
invalid host names or addresses are :class:`~vmigrate.errors.ConfigError`;
a directory that cannot be written is :class:`EnvironmentError_`. After an
error no file is half-written: every file is replaced atomically.

This module is a bottom layer: it imports only :mod:`vmigrate.errors`, the
standard library and ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmigrate.errors import ConfigError, EnvironmentError_

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "QEMU_FILES",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertInfo",
    "TlsFiles",
    "ca_exists",
    "ca_info",
    "cert_info",
    "check_migration",
    "create_ca",
    "host_credentials",
    "is_secret",
    "issued_by",
    "record_dir",
    "record_issued",
    "write_local",
    "x509_dn",
]

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
#: the files QEMU's tls-creds-x509 reads from its ``dir`` (server and client endpoint)
QEMU_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)

CA_DAYS = 3650
CERT_DAYS = 365
KEY_BITS = 2048
CLOCK_SKEW = dt.timedelta(minutes=5)
ORGANIZATION = "vmigrate"

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for display and checks."""

    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    is_ca: bool
    fingerprint_sha256: str

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) >= self.not_after

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": f"{self.serial:x}",
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "dns_names": list(self.dns_names),
            "ip_addresses": list(self.ip_addresses),
            "is_ca": self.is_ca,
            "fingerprint_sha256": self.fingerprint_sha256,
            "expired": self.expired(),
        }


# -- the CA --------------------------------------------------------------------


def ca_exists(dir: Path) -> bool:
    """Does ``dir`` hold a CA certificate?"""
    return (dir / CA_CERT).is_file()


def create_ca(dir: Path, *, name: str = "vmigrate CA") -> None:
    """Create a self-signed CA in ``dir`` (``ca-cert.pem``, ``ca-key.pem`` 0600).

    Idempotent: an existing, consistent CA is kept as it is (whatever its
    name). A directory holding only one of the two files raises
    :class:`ConfigError` and is left alone.
    """
    if not name.strip():
        raise ConfigError("the CA needs a non-empty name")
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    if cert_path.exists() or key_path.exists():
        _load_ca(dir)  # raises if inconsistent
        return
    key = _new_key()
    now = _now()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _mkdir(dir)
    # the key first: a crash in between leaves a key without a certificate, which
    # create_ca reports instead of silently replacing
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ca_info(dir: Path) -> CertInfo:
    """The CA certificate of ``dir``; raises like :func:`host_credentials`."""
    cert, _key = _load_ca(dir)
    return _info(cert)


# -- host credentials ------------------------------------------------------------


def host_credentials(ca_dir: Path, host: str, addresses: Sequence[str], *,
                     now: dt.datetime | None = None, days: int = CERT_DAYS
                     ) -> dict[str, bytes]:
    """Issue a server and a client certificate for ``host``, signed by the CA in
    ``ca_dir``; return the five files QEMU reads (see :data:`QEMU_FILES`).

    Both name the host as ``O=vmigrate, CN=<host>`` (the client certificate's DN is
    what a destination's ``tls-authz`` allows, see :func:`x509_dn`) and as
    DNS=``host`` plus every entry of ``addresses`` in their subjectAltName (IP
    addresses as IP SANs, names as DNS SANs: the source checks the destination's
    certificate against the address it connects to). ``now`` and ``days`` set the
    validity (tests issue expired certificates with them). Raises
    :class:`EnvironmentError_` without a CA, :class:`ConfigError` for an invalid
    host name or address or an unusable (e.g. expired) CA.
    """
    _check_dns_name(host, what="host name")
    dns_names: list[str] = [host]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for addr in addresses:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            _check_dns_name(addr, what=f"address of host {host}")
            if addr not in dns_names:
                dns_names.append(addr)
            continue
        if ip not in ips:
            ips.append(ip)
    ca_cert, ca_key = _load_ca(ca_dir)
    now = now or _now()
    if ca_cert.not_valid_after_utc <= now + dt.timedelta(days=1):
        raise ConfigError(
            f"the CA in {ca_dir} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}: create a "
            "new one (move the directory away, 'vmigrate certs init') and reissue every host"
        )
    sans = [*(x509.DNSName(n) for n in dns_names), *(x509.IPAddress(ip) for ip in ips)]
    server_key, client_key = _new_key(), _new_key()
    server = _leaf(ca_cert, ca_key, server_key, host, sans, ExtendedKeyUsageOID.SERVER_AUTH,
                   now, days)
    client = _leaf(ca_cert, ca_key, client_key, host, sans, ExtendedKeyUsageOID.CLIENT_AUTH,
                   now, days)
    pem = serialization.Encoding.PEM
    return {
        CA_CERT: ca_cert.public_bytes(pem),
        SERVER_CERT: server.public_bytes(pem),
        SERVER_KEY: _key_pem(server_key),
        CLIENT_CERT: client.public_bytes(pem),
        CLIENT_KEY: _key_pem(client_key),
    }


def is_secret(name: str) -> bool:
    """Is the credential file ``name`` a private key (to be kept 0600)?"""
    return name.endswith("-key.pem")


def write_local(dir: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``dir`` (created 0700 if missing), each replaced
    atomically; private keys 0600, certificates 0644."""
    for name in files:
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError(f"not a plain file name: {name!r}")
    _mkdir(dir)
    for name, data in files.items():
        _write_atomic(dir / name, data, 0o600 if is_secret(name) else 0o644)


def record_dir(ca_dir: Path, host: str) -> Path:
    """Where the record of ``host``'s credentials is kept: ``<ca_dir>/hosts/<host>``."""
    _check_dns_name(host, what="host name")
    return ca_dir / "hosts" / host


def record_issued(ca_dir: Path, host: str, files: Mapping[str, bytes], *,
                  keys: bool = False) -> Path:
    """Keep a record of ``host``'s credentials under :func:`record_dir`: the
    certificates, and the private keys only if ``keys`` (otherwise any older
    keys there are removed, so a record never pairs new certificates with old
    keys). Returns the record directory."""
    where = record_dir(ca_dir, host)
    write_local(where, {n: d for n, d in files.items() if keys or not is_secret(n)})
    if not keys:
        for name in files:
            if is_secret(name):
                with contextlib.suppress(FileNotFoundError):
                    (where / name).unlink()
    return where


# -- inspection ------------------------------------------------------------------


def cert_info(pem: bytes) -> CertInfo:
    """Parse one PEM certificate; :class:`ConfigError` if it is not one."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
    return _info(cert)


def issued_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Was the certificate signed by this CA (issuer name and signature)?"""
    return _signed_by(_load_cert(cert_pem, "certificate"), _load_cert(ca_cert_pem, "certificate"))


# -- authorisation: who may connect to a destination ------------------------------


def x509_dn(cert_pem: bytes) -> str:
    """The certificate's subject as QEMU's ``tls-authz`` matches it: the distinguished
    name GnuTLS prints (``gnutls_x509_crt_get_dn``), its RDNs in the order they are
    encoded, RFC 4514 escaping (``O=vmigrate,CN=h1`` for our certificates: seen on
    QEMU 7.2 / GnuTLS 3.7, which refuses the reversed ``CN=h1,O=vmigrate``).
    :class:`ConfigError` if ``cert_pem`` is not a certificate."""
    cert = _load_cert(cert_pem, "certificate")
    return ",".join(rdn.rfc4514_string() for rdn in cert.subject.rdns)


@dataclass(frozen=True)
class TlsFiles:
    """The public half of one host's QEMU credentials (its ``tls_path``): the CA it
    trusts, and its server and client certificates (PEM)."""

    host: str
    ca: bytes
    server: bytes
    client: bytes


def check_migration(src: TlsFiles, dst: TlsFiles, dest_address: str, *,
                    now: dt.datetime | None = None) -> list[str]:
    """What stops the source ``src`` from migrating over TLS to ``dst``, which it
    reaches at ``dest_address`` (its migration address); [] when nothing does.

    Checks what QEMU's handshake will check, so that it fails here with a reason
    instead of in the middle of a job: the four certificates in use (both CAs, the
    source's client certificate, the destination's server certificate) are valid
    now; both hosts trust the same CA, which issued both certificates; the
    destination's server certificate names ``dest_address`` (IP SAN, or DNS SAN for a
    name) and is for server authentication; the source's client certificate names
    the source host (its CN or a DNS SAN) and is for client authentication."""
    now = now or _now()
    problems: list[str] = []
    certs: dict[str, x509.Certificate] = {}
    for label, pem in ((f"{src.host}'s CA certificate ({CA_CERT})", src.ca),
                       (f"{src.host}'s client certificate ({CLIENT_CERT})", src.client),
                       (f"{dst.host}'s CA certificate ({CA_CERT})", dst.ca),
                       (f"{dst.host}'s server certificate ({SERVER_CERT})", dst.server)):
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            problems.append(f"{label} is not a PEM certificate")
            continue
        certs[label] = cert
        if cert.not_valid_before_utc > now:
            problems.append(f"{label} is not valid before "
                            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if cert.not_valid_after_utc <= now:
            problems.append(f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if len(certs) < 4:
        return problems
    src_ca, client, dst_ca, server = certs.values()
    for label, ca in ((f"{src.host}'s {CA_CERT}", src_ca), (f"{dst.host}'s {CA_CERT}", dst_ca)):
        if not _is_ca(ca):
            problems.append(f"{label} is not a CA certificate (basicConstraints CA:TRUE)")
    if src_ca.fingerprint(hashes.SHA256()) != dst_ca.fingerprint(hashes.SHA256()):
        problems.append(f"{src.host} and {dst.host} trust different CAs "
                        f"({src_ca.subject.rfc4514_string()} and "
                        f"{dst_ca.subject.rfc4514_string()}): issue both from one CA")
    if not _signed_by(server, src_ca):
        problems.append(f"{dst.host}'s server certificate was not issued by the CA "
                        f"{src.host} trusts ({src_ca.subject.rfc4514_string()})")
    if not _signed_by(client, dst_ca):
        problems.append(f"{src.host}'s client certificate was not issued by the CA "
                        f"{dst.host} trusts ({dst_ca.subject.rfc4514_string()})")
    s_dns, s_ips = _sans(server)
    try:
        wanted = ipaddress.ip_address(dest_address)
        names_it = any(ipaddress.ip_address(ip) == wanted for ip in s_ips)
    except ValueError:
        names_it = dest_address.lower() in (n.lower() for n in s_dns)
    if not names_it:
        named = ", ".join([*s_dns, *s_ips]) or "nothing"
        problems.append(f"{dst.host}'s server certificate does not name its migration "
                        f"address {dest_address} (it names {named}): reissue it "
                        f"('vmigrate certs issue {dst.host}')")
    c_dns, _c_ips = _sans(client)
    cns = [str(a.value) for a in client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if src.host not in cns and src.host.lower() not in (n.lower() for n in c_dns):
        problems.append(f"{src.host}'s client certificate is for "
                        f"{client.subject.rfc4514_string()}, not {src.host}")
    if not _has_purpose(server, ExtendedKeyUsageOID.SERVER_AUTH):
        problems.append(f"{dst.host}'s server certificate is not for server authentication")
    if not _has_purpose(client, ExtendedKeyUsageOID.CLIENT_AUTH):
        problems.append(f"{src.host}'s client certificate is not for client authentication")
    return problems


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def _has_purpose(cert: x509.Certificate, purpose: x509.ObjectIdentifier) -> bool:
    """No extendedKeyUsage: any purpose (as GnuTLS has it)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return purpose in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM {what}: {exc}") from exc


# -- helpers ---------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _serial() -> int:
    # positive, at most 20 octets (RFC 5280), never 0
    return secrets.randbits(159) | 1


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
        key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey,
    host: str,
    sans: list[x509.GeneralName],
    purpose: x509.ObjectIdentifier,
    now: dt.datetime,
    days: int = CERT_DAYS,
) -> x509.Certificate:
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, host),
    ])
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(dir: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    has_cert, has_key = cert_path.exists(), key_path.exists()
    if not has_cert and not has_key:
        raise EnvironmentError_(f"no CA in {dir}: run 'vmigrate certs init' first")
    if not has_key:
        raise ConfigError(f"{dir} has {CA_CERT} but no {CA_KEY}: restore the key, or move "
                          "the directory away and create a new CA")
    if not has_cert:
        raise ConfigError(f"{dir} has {CA_KEY} but no {CA_CERT} (an interrupted 'certs "
                          "init'?): remove the key, or restore the certificate")
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise EnvironmentError_(f"cannot read the CA in {dir}: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise ConfigError(f"{key_path} is encrypted; vmigrate needs an unencrypted CA key"
                          ) from exc
    except ValueError as exc:
        raise ConfigError(f"{key_path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{key_path} is not an RSA key")
    if _public_der(key) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{key_path} does not belong to {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
    return cert, key


def _public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns,
        ip_addresses=ips,
        is_ca=is_ca,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":"),
    )


def _check_dns_name(name: str, *, what: str) -> None:
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(f"invalid {what} {name!r}: need a DNS name (letters, digits, "
                          "'-' and '.') or an IP address")


def _mkdir(dir: Path) -> None:
    try:
        dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentError_(f"cannot create {dir}: {exc}") from exc


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is subject to the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EnvironmentError_(f"cannot write {path}: {exc}") from exc
