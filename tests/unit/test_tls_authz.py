"""TLS that authorises: only the job's source may connect to the destination's migration
port and NBD export; begin refuses credentials that cannot work (exit 2, nothing
started); no TLS only on purpose (--insecure). On the fake hypervisor, which models
tls-authz as QEMU 7.2 does (checked at the handshake; a refused client leaves the
listener waiting)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.test_engine import LOCAL, VM, World, assert_consistent, host
from vmigrate import pki
from vmigrate.config import Inventory
from vmigrate.drivers.base import NbdAddress
from vmigrate.errors import QmpCommandError
from vmigrate.qemu.spec import VMSpec
from vmigrate.testing.fakehv import AuthzObject, FakeCluster, FakeVm


class World3(World):
    """Two hosts in the job, and h3: a host of the same fleet (same CA) that is not
    the job's source."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.inventory = Inventory(hosts={"h1": host(1), "h2": host(2), "h3": host(3)})
        self.cluster = FakeCluster(self.inventory)
        self.cluster.add_vm("h1", self.spec, ram=256 * (1 << 20), dirty_rate=self.dirty_rate)


def client_dn(w: World, name: str) -> str:
    cfg = w.inventory.host(name)
    image = w.cluster.host(name).files[f"{cfg.tls_path}/{pki.CLIENT_CERT}"]
    return pki.x509_dn(image.read(0, image.size))


def dest_vm(w: World) -> FakeVm | None:
    return w.cluster.host("h2").vms.get(VM)


async def until(cond: Callable[[], object]) -> None:
    """Let the migration task run until ``cond()`` holds (bounded: never hangs)."""
    for _ in range(200_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the migration never got there")


async def intruder(w: World, name: str = "intruder") -> FakeVm:
    """A VM on h3 whose QEMU holds h3's own (valid, same-CA) client credentials."""
    spec = VMSpec(name=name, memory_mib=64)
    vm = w.cluster.add_vm("h3", spec, ram=64 << 20)
    mon = w.cluster.driver("h3").monitor(name)
    await mon.add_tls("stolen", str(w.inventory.host("h3").tls_path), "client")
    return vm


@pytest.mark.parametrize("mode", ["live", "online"])
async def test_destination_allows_only_the_source(tmp_path: Path, mode: str) -> None:
    w = World(tmp_path, mode)
    report = await w.migrate()
    assert report.status == "completed", report.error
    assert assert_consistent(w) == "completed"
    dest = dest_vm(w)
    assert dest is not None
    authz = [o for o in dest.objects.values() if isinstance(o, AuthzObject)]
    assert [a.identity for a in authz] == [client_dn(w, "h1")] == ["O=vmigrate,CN=h1"]
    assert dest.params["tls-authz"] == authz[0].id
    assert report.stream_security == "tls"
    starts = [c for c in w.cluster.calls if c.method == "nbd_server_start"]
    assert len(starts) == (1 if mode == "online" else 0)


async def test_another_hosts_certificate_cannot_use_the_nbd_export(tmp_path: Path) -> None:
    w = World3(tmp_path, "online")
    await intruder(w)
    mon = w.cluster.driver("h3").monitor("intruder")
    tried: list[str] = []

    async def attack() -> None:
        await until(lambda: (d := dest_vm(w)) is not None and d.nbd is not None
                    and d.nbd.exports)
        dest = dest_vm(w)
        assert dest is not None and dest.nbd is not None
        address = NbdAddress(host="10.241.1.12", port=dest.nbd.address.port)
        export = next(iter(dest.nbd.exports.values())).name
        with pytest.raises(QmpCommandError) as info:
            await mon.nbd_client_add("evil", address, export, tls_id="stolen")
        tried.append(str(info.value))
        # without TLS at all: refused too (the server requires it)
        with pytest.raises(QmpCommandError):
            await mon.nbd_client_add("evil2", address, export)
        assert "evil" not in w.cluster.host("h3").vms["intruder"].nodes

    task = asyncio.create_task(attack())
    report = await w.migrate()
    await task
    assert tried and "authz" in tried[0]
    assert report.status == "completed", report.error
    assert assert_consistent(w) == "completed"
    assert w.cluster.lost_writes(VM) == []


async def test_another_hosts_certificate_cannot_feed_the_migration_port(
        tmp_path: Path) -> None:
    w = World3(tmp_path, "live")
    bad = await intruder(w)
    mon = w.cluster.driver("h3").monitor("intruder")
    await mon.set_parameters({"tls-creds": "stolen"})
    seen: list[tuple[str, str | None, bool]] = []

    async def attack() -> None:
        await until(lambda: (d := dest_vm(w)) is not None and d.listen_uri is not None)
        dest = dest_vm(w)
        assert dest is not None
        uri = dest.listen_uri
        assert uri is not None
        await mon.migrate(uri)
        assert bad.outgoing is not None
        # the destination still waits for its source
        seen.append((bad.outgoing.status, bad.outgoing.error,
                     dest.listen_uri == uri and dest.incoming_migration is None))

    task = asyncio.create_task(attack())
    report = await w.migrate()
    await task
    assert len(seen) == 1
    status, error, still_listening = seen[0]
    assert status == "failed" and error is not None and "authz" in error
    assert still_listening
    assert report.status == "completed", report.error
    assert assert_consistent(w) == "completed"


def _install(w: World, host_name: str, files: dict[str, bytes]) -> None:
    w.cluster.install_credentials(host_name, files)


@pytest.mark.parametrize("case", ["expired", "other-ca", "wrong-address", "no-files"])
async def test_begin_refuses_credentials_that_cannot_work(tmp_path: Path, case: str) -> None:
    w = World(tmp_path, "online")
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    if case == "expired":
        # same names, the fleet CA: but h2's server certificate expired last year
        from vmigrate.testing.fakehv import _pki

        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        _install(w, "h2", pki.host_credentials(_pki.ca_dir(), "h2", ["10.241.1.12"],
                                               now=long_ago, days=30))
    elif case == "other-ca":
        _install(w, "h2", pki.host_credentials(ca, "h2", ["10.241.1.12"]))
    elif case == "wrong-address":
        from vmigrate.testing.fakehv import _pki

        _install(w, "h2", pki.host_credentials(_pki.ca_dir(), "h2", ["10.9.9.9"]))
    else:
        w.cluster._drop_file("h2", f"{w.inventory.host('h2').tls_path}/{pki.SERVER_CERT}")
    report = await w.migrate()
    assert report.status == "failed" and report.phase == "begin"
    assert report.exit_status == (3 if case == "no-files" else 2)
    # nothing started, nothing allocated
    assert dest_vm(w) is None and w.runs_on("h1")
    assert not any(p.startswith(LOCAL) for p in w.cluster.host("h2").files)
    assert not any(c.host == "h2" and c.method in ("start_vm", "create_image")
                   for c in w.cluster.calls)
    assert not w.job().locks_vm


@pytest.mark.parametrize("mode", ["live", "online"])
async def test_no_tls_needs_insecure(tmp_path: Path, mode: str) -> None:
    w = World(tmp_path, mode)
    report = await w.migrate(tls=False)
    assert report.status == "failed" and report.phase == "begin"
    assert report.exit_status == 2 and dest_vm(w) is None and w.runs_on("h1")
    report = await w.migrate(tls=False, insecure=True)
    assert report.status == "completed", report.error
    assert report.stream_security == "none" and not report.tls
    assert any("--insecure" in n for n in report.notes)
    dest = dest_vm(w)
    assert dest is not None and "tls-authz" not in {k for k, v in dest.params.items() if v}


async def test_insecure_nbd_takes_only_the_sources_connections(tmp_path: Path) -> None:
    w = World3(tmp_path, "online")
    await intruder(w)
    mon = w.cluster.driver("h3").monitor("intruder")
    tried: list[str] = []

    async def attack() -> None:
        # once the source's client is connected, nobody else gets in
        await until(lambda: [n for n in w.cluster.host("h1").vms[VM].nodes.values()
                             if n.kind == "nbd"])
        dest = dest_vm(w)
        assert dest is not None and dest.nbd is not None
        assert dest.nbd.max_connections == 1 and dest.nbd.tls_id is None
        with pytest.raises(QmpCommandError) as info:
            await mon.nbd_client_add("evil", dest.nbd.address,
                                     next(iter(dest.nbd.exports.values())).name)
        tried.append(str(info.value))

    task = asyncio.create_task(attack())
    report = await w.migrate(tls=False, insecure=True)
    await task
    assert tried and "refused" in tried[0]
    assert report.status == "completed", report.error
