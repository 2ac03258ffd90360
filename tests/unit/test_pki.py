"""x509 credentials for QEMU TLS migration: CA, host certificates, files, the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from vmigrate import pki
from vmigrate.cli import certs as certs_cli
from vmigrate.config import parse_inventory
from vmigrate.errors import ConfigError, EnvironmentError_
from vmigrate.hosts import LocalHost
from vmigrate.service import certs


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "ca"
    pki.create_ca(d, name="test CA")
    return d


@pytest.fixture(scope="module")
def creds(ca_dir: Path) -> dict[str, bytes]:
    return pki.host_credentials(ca_dir, "h1", ["10.240.1.11", "10.241.1.11", "hv1.example"])


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the CA ----------------------------------------------------------------------


def test_ca_files_and_fields(ca_dir: Path) -> None:
    assert mode(ca_dir / pki.CA_KEY) == 0o600
    assert mode(ca_dir) == 0o700
    ca = load((ca_dir / pki.CA_CERT).read_bytes())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca.verify_directly_issued_by(ca)  # self-signed
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3640) < life < dt.timedelta(days=3660)
    info = pki.ca_info(ca_dir)
    assert info.is_ca and not info.expired() and info.subject == "CN=test CA,O=vmigrate"


def test_create_ca_is_idempotent(ca_dir: Path) -> None:
    before = {n: (ca_dir / n).read_bytes() for n in (pki.CA_CERT, pki.CA_KEY)}
    pki.create_ca(ca_dir, name="another name")
    assert {n: (ca_dir / n).read_bytes() for n in before} == before


def test_two_cas_differ(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "a")
    pki.create_ca(tmp_path / "b")
    a = (tmp_path / "a" / pki.CA_CERT).read_bytes()
    b = (tmp_path / "b" / pki.CA_CERT).read_bytes()
    assert a != b
    assert not pki.issued_by(a, b)


def test_missing_ca_is_environment_error(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentError_):
        pki.host_credentials(tmp_path / "nothing", "h1", [])
    with pytest.raises(EnvironmentError_):
        pki.ca_info(tmp_path)


@pytest.mark.parametrize("keep", [pki.CA_CERT, pki.CA_KEY])
def test_half_a_ca_is_refused_and_kept(tmp_path: Path, ca_dir: Path, keep: str) -> None:
    d = tmp_path / "half"
    d.mkdir()
    (d / keep).write_bytes((ca_dir / keep).read_bytes())
    with pytest.raises(ConfigError):
        pki.create_ca(d)
    with pytest.raises(ConfigError):
        pki.host_credentials(d, "h1", [])
    assert [p.name for p in d.iterdir()] == [keep]


def test_key_of_another_ca_is_refused(tmp_path: Path, ca_dir: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(other)
    (other / pki.CA_KEY).write_bytes((ca_dir / pki.CA_KEY).read_bytes())
    with pytest.raises(ConfigError, match="does not belong"):
        pki.host_credentials(other, "h1", [])


def test_garbage_ca_is_config_error(tmp_path: Path) -> None:
    (tmp_path / pki.CA_CERT).write_text("not a cert")
    (tmp_path / pki.CA_KEY).write_text("not a key")
    with pytest.raises(ConfigError):
        pki.ca_info(tmp_path)


# -- host credentials ------------------------------------------------------------


def test_exactly_the_files_qemu_reads(creds: dict[str, bytes], ca_dir: Path) -> None:
    assert set(creds) == {"ca-cert.pem", "server-cert.pem", "server-key.pem",
                          "client-cert.pem", "client-key.pem"}
    assert creds["ca-cert.pem"] == (ca_dir / pki.CA_CERT).read_bytes()
    for name in ("server-key.pem", "client-key.pem"):
        assert creds[name].startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(("name", "purpose"), [
    ("server-cert.pem", ExtendedKeyUsageOID.SERVER_AUTH),
    ("client-cert.pem", ExtendedKeyUsageOID.CLIENT_AUTH),
])
def test_host_certificate_fields(creds: dict[str, bytes], name: str,
                                 purpose: x509.ObjectIdentifier) -> None:
    cert = load(creds[name])
    ca = load(creds["ca-cert.pem"])
    assert cert.issuer == ca.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "h1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    # QEMU 7.2 requires both when keyUsage is critical
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [purpose]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h1", "hv1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.240.1.11"), ipaddress.ip_address("10.241.1.11")]
    cert.verify_directly_issued_by(ca)
    assert pki.issued_by(creds[name], creds["ca-cert.pem"])
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now  # usable at once, even with a little skew
    assert dt.timedelta(days=364) < cert.not_valid_after_utc - now <= dt.timedelta(days=366)
    # server and client keys are distinct, and match their certificates
    key = serialization.load_pem_private_key(
        creds[name.replace("cert", "key")], password=None)
    assert key.public_key() == cert.public_key()


def test_server_chain_verifies_for_its_ip_and_name(creds: dict[str, bytes]) -> None:
    store = Store([load(creds["ca-cert.pem"])])
    leaf = load(creds["server-cert.pem"])
    for subject in (x509.IPAddress(ipaddress.ip_address("10.241.1.11")),
                    x509.DNSName("h1")):
        verifier = PolicyBuilder().store(store).build_server_verifier(subject)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == load(creds["ca-cert.pem"])
    wrong = PolicyBuilder().store(store).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("10.241.1.12")))
    with pytest.raises(VerificationError):
        wrong.verify(leaf, [])


def test_client_chain_verifies(creds: dict[str, bytes]) -> None:
    store = Store([load(creds["ca-cert.pem"])])
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(load(creds["client-cert.pem"]), [])
    assert verified.chain[-1] == load(creds["ca-cert.pem"])


def test_other_ca_does_not_verify(creds: dict[str, bytes], tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    store = Store([load((tmp_path / pki.CA_CERT).read_bytes())])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("h1"))
    with pytest.raises(VerificationError):
        verifier.verify(load(creds["server-cert.pem"]), [])


def test_duplicate_addresses_once(ca_dir: Path) -> None:
    files = pki.host_credentials(ca_dir, "h2", ["10.0.0.1", "10.0.0.1", "h2", "::1"])
    info = pki.cert_info(files["server-cert.pem"])
    assert info.dns_names == ("h2",) and info.ip_addresses == ("10.0.0.1", "::1")


@pytest.mark.parametrize(("host", "addresses"), [
    ("bad host", []), ("", []), ("h1", ["not an address!"]), ("-h", []), ("h1", [""]),
])
def test_invalid_names_are_config_errors(ca_dir: Path, host: str, addresses: list[str]) -> None:
    with pytest.raises(ConfigError):
        pki.host_credentials(ca_dir, host, addresses)


def test_write_local_modes_and_replace(tmp_path: Path, creds: dict[str, bytes]) -> None:
    d = tmp_path / "data" / "tls"
    pki.write_local(d, creds)
    assert sorted(p.name for p in d.iterdir()) == sorted(creds)
    assert mode(d) == 0o700
    for name, data in creds.items():
        assert (d / name).read_bytes() == data
        assert mode(d / name) == (0o600 if name.endswith("-key.pem") else 0o644)
    pki.write_local(d, {"server-cert.pem": b"new"})
    assert (d / "server-cert.pem").read_bytes() == b"new"
    assert sorted(p.name for p in d.iterdir()) == sorted(creds)  # no temporary left
    with pytest.raises(ValueError):
        pki.write_local(d, {"../x": b""})


def test_record_issued_keeps_keys_only_when_asked(tmp_path: Path, ca_dir: Path,
                                                  creds: dict[str, bytes]) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    where = pki.record_issued(ca, "h1", creds, keys=True)
    assert (where / "server-key.pem").exists()
    where = pki.record_issued(ca, "h1", creds)
    assert sorted(p.name for p in where.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "server-cert.pem"]


# -- service: install on a host, issue for an inventory ----------------------------


def test_install_on_a_host(tmp_path: Path, creds: dict[str, bytes]) -> None:
    tls = tmp_path / "host" / "tls"
    asyncio.run(certs.install(LocalHost("h1"), str(tls), creds))
    assert mode(tls) == 0o700
    for name, data in creds.items():
        assert (tls / name).read_bytes() == data
        assert mode(tls / name) == (0o600 if name.endswith("-key.pem") else 0o644)
    assert sorted(p.name for p in tls.iterdir()) == sorted(creds)


def inventory_text(tmp_path: Path) -> str:
    return (f'[hosts.a]\ntransport = "local"\naddress = "192.0.2.10"\n'
            f'migration_address = "198.51.100.10"\ndata_dir = "{tmp_path}/a"\n'
            f'[hosts.b]\ntransport = "local"\naddress = "b.example"\n'
            f'data_dir = "{tmp_path}/b"\ntls_dir = "{tmp_path}/b-tls"\n')


def test_issue_push_and_local(tmp_path: Path) -> None:
    inv = parse_inventory(inventory_text(tmp_path))
    ca = tmp_path / "pki"
    with pytest.raises(EnvironmentError_):
        asyncio.run(certs.issue(inv, ca, ["a"]))
    pki.create_ca(ca)
    done = asyncio.run(certs.issue(inv, ca, ["a", "b"], push=True))
    assert [d.host for d in done] == ["a", "b"]
    assert done[0].server.ip_addresses == ("192.0.2.10", "198.51.100.10")
    assert done[1].server.dns_names == ("b", "b.example")
    for where in (tmp_path / "a" / "tls", tmp_path / "b-tls"):
        assert sorted(p.name for p in where.iterdir()) == sorted(pki.QEMU_FILES)
    st = certs.status(ca)
    assert [(h.host, h.keys_local, h.from_this_ca) for h in st.hosts] == [
        ("a", False, True), ("b", False, True)]
    local = asyncio.run(certs.issue(inv, ca, ["a"], push=False))
    assert local[0].record == ca / "hosts" / "a"
    assert (ca / "hosts" / "a" / "client-key.pem").exists()


def test_cli_init_issue_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "vmigrate.toml").write_text(inventory_text(tmp_path))
    monkeypatch.setenv("VMIGRATE_HOME", str(home))
    monkeypatch.delenv("VMIGRATE_CONFIG", raising=False)
    runner = CliRunner()

    res = runner.invoke(certs_cli.app, ["show"])
    assert isinstance(res.exception, EnvironmentError_)  # main() turns it into exit 3

    res = runner.invoke(certs_cli.app, ["init", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["created"] and data["dir"] == str(home / "pki")
    res = runner.invoke(certs_cli.app, ["init"])
    assert res.exit_code == 0 and "kept" in res.output

    res = runner.invoke(certs_cli.app, ["issue", "a", "--no-push", "--json"])
    assert res.exit_code == 0, res.output
    issued = json.loads(res.output)
    assert issued[0]["host"] == "a" and not issued[0]["pushed"]
    assert issued[0]["ip_addresses"] == ["192.0.2.10", "198.51.100.10"]
    assert sorted(p.name for p in (home / "pki" / "hosts" / "a").iterdir()) == sorted(
        pki.QEMU_FILES)

    res = runner.invoke(certs_cli.app, ["issue", "b"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b-tls" / "server-key.pem").exists()

    res = runner.invoke(certs_cli.app, ["issue", "nosuch"])
    assert res.exception is not None and getattr(res.exception, "exit_code", 0) == 2

    res = runner.invoke(certs_cli.app, ["show", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["ca"]["subject"] == "CN=vmigrate CA,O=vmigrate"
    assert [(h["host"], h["keys"], h["from_this_ca"]) for h in shown["hosts"]] == [
        ("a", "local", True), ("b", "pushed", True)]
    assert [h["authz_dn"] for h in shown["hosts"]] == ["O=vmigrate,CN=a", "O=vmigrate,CN=b"]
    res = runner.invoke(certs_cli.app, ["show"])
    assert res.exit_code == 0 and "vmigrate CA" in res.output

    res = runner.invoke(certs_cli.app, ["--help"])
    assert res.exit_code == 0 and "init" in res.output and "issue" in res.output


# -- authorisation: x509 DN and the checks of begin --------------------------------------


def files(creds: dict[str, bytes], host: str) -> pki.TlsFiles:
    return pki.TlsFiles(host, creds[pki.CA_CERT], creds[pki.SERVER_CERT],
                        creds[pki.CLIENT_CERT])


@pytest.fixture(scope="module")
def pair(ca_dir: Path) -> tuple[pki.TlsFiles, pki.TlsFiles]:
    h1 = pki.host_credentials(ca_dir, "h1", ["10.240.1.11", "10.241.1.11"])
    h2 = pki.host_credentials(ca_dir, "h2", ["10.240.1.12", "10.241.1.12"])
    return files(h1, "h1"), files(h2, "h2")


def test_x509_dn_is_in_encoding_order(creds: dict[str, bytes]) -> None:
    # what QEMU 7.2 / GnuTLS matches tls-authz identities against (tried on this
    # machine's qemu-nbd: "O=vmigrate,CN=h1" is allowed, "CN=h1,O=vmigrate" refused)
    assert pki.x509_dn(creds[pki.CLIENT_CERT]) == "O=vmigrate,CN=h1"
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "A, B+C"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "h1")])
    key = serialization.load_pem_private_key(creds[pki.CLIENT_KEY], password=None)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1))
            .not_valid_after(dt.datetime(2030, 1, 1))
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert pki.x509_dn(pem) == r"C=GB,O=A\, B\+C,CN=h1"
    with pytest.raises(ConfigError):
        pki.x509_dn(b"garbage")


def test_a_good_pair_passes(pair: tuple[pki.TlsFiles, pki.TlsFiles]) -> None:
    src, dst = pair
    assert pki.check_migration(src, dst, "10.241.1.12") == []
    assert pki.check_migration(dst, src, "10.241.1.11") == []


def test_destination_must_name_the_address(pair: tuple[pki.TlsFiles, pki.TlsFiles]) -> None:
    src, dst = pair
    problems = pki.check_migration(src, dst, "10.241.1.99")
    assert len(problems) == 1 and "10.241.1.99" in problems[0]
    # the source's certificate is h1's: offering it as another host's is refused
    assert len(pki.check_migration(pki.TlsFiles("h3", src.ca, src.server, src.client), dst,
                                   "10.241.1.12")) == 1


def test_expired_and_future_certificates(ca_dir: Path,
                                         pair: tuple[pki.TlsFiles, pki.TlsFiles]) -> None:
    src, _dst = pair
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    old = files(pki.host_credentials(ca_dir, "h2", ["10.241.1.12"], now=long_ago, days=30),
                "h2")
    problems = pki.check_migration(src, old, "10.241.1.12")
    assert len(problems) == 1 and "expired" in problems[0]
    # the source's client certificate too
    old1 = files(pki.host_credentials(ca_dir, "h1", ["10.241.1.11"], now=long_ago, days=30),
                 "h1")
    assert len(pki.check_migration(old1, pair[1], "10.241.1.12")) == 1
    later = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    assert len(pki.check_migration(src, pair[1], "10.241.1.12", now=later)) >= 1


def test_another_ca_is_refused(tmp_path: Path,
                               pair: tuple[pki.TlsFiles, pki.TlsFiles]) -> None:
    src, _dst = pair
    pki.create_ca(tmp_path / "rogue")
    rogue = files(pki.host_credentials(tmp_path / "rogue", "h2", ["10.241.1.12"]), "h2")
    problems = pki.check_migration(src, rogue, "10.241.1.12")
    # different CAs, and each certificate not issued by the other side's CA
    assert len(problems) == 3
    # a destination that trusts the right CA but shows a rogue server certificate
    mixed = pki.TlsFiles("h2", src.ca, rogue.server, rogue.client)
    assert len(pki.check_migration(src, mixed, "10.241.1.12")) == 1
    bad = pki.TlsFiles("h2", b"junk", rogue.server, rogue.client)
    assert pki.check_migration(src, bad, "10.241.1.12") == [
        "h2's CA certificate (ca-cert.pem) is not a PEM certificate"]


def test_certificates_swapped_for_the_wrong_purpose(
        pair: tuple[pki.TlsFiles, pki.TlsFiles]) -> None:
    src, dst = pair
    # a client certificate offered as the server's (and the other way round)
    swapped = pki.check_migration(pki.TlsFiles("h1", src.ca, src.client, src.server),
                                  pki.TlsFiles("h2", dst.ca, dst.client, dst.server),
                                  "10.241.1.12")
    assert len(swapped) == 2
