"""The fake cluster's state: hosts, files, VM processes and what they hold.

Plain data, inspected by the tests; the behaviour lives in :mod:`._cluster`,
:mod:`._migration` and the seams (:mod:`._driver`, :mod:`._monitor`, :mod:`._mover`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from vmigrate.config import HostConfig
from vmigrate.drivers.base import NbdAddress
from vmigrate.qemu.spec import VMSpec
from vmigrate.testing.fakehv._qemu import FakeQemu, captured_qemu

if TYPE_CHECKING:
    from vmigrate.testing.fakehv._migration import FakeMigration

__all__ = [
    "AckedWrite",
    "AuthzObject",
    "FakeBitmap",
    "FakeExport",
    "FakeHost",
    "FakeImage",
    "FakeJob",
    "FakeNbdServer",
    "FakeNode",
    "FakeVm",
    "GuestProfile",
    "PortUse",
    "SplitBrain",
    "TlsObject",
    "guest_record",
    "parse_record",
]

_RECORD = re.compile(rb"^(?P<vm>[^\s]+) seq=(?P<seq>\d+)\n")


def guest_record(vm: str, seq: int) -> bytes:
    """What the fake guest of ``vm`` writes into a disk block for write number ``seq``."""
    return f"{vm} seq={seq}\n".encode()


def parse_record(data: bytes) -> tuple[str, int] | None:
    """``(vm, seq)`` of a block holding a guest record, else None."""
    match = _RECORD.match(data)
    return (match["vm"].decode(), int(match["seq"])) if match else None


@dataclass(eq=False)
class FakeImage:
    """A file on a host: a disk image (raw or qcow2) or any other file (``raw``).

    Its content is kept per block of ``block_size`` bytes, without trailing zeroes;
    a block that is all zeroes is a hole (not allocated). Several hosts may hold the
    same object (shared storage).
    """

    path: str
    format: str
    size: int
    block_size: int = 64 * 1024
    blocks: dict[int, bytes] = field(default_factory=dict)
    #: pids of the processes holding the image active and writable (QEMU's write lock)
    writers: set[int] = field(default_factory=set)

    @property
    def nblocks(self) -> int:
        return max(1, -(-self.size // self.block_size))

    def block_len(self, index: int) -> int:
        return max(0, min(self.block_size, self.size - index * self.block_size))

    def read_block(self, index: int) -> bytes:
        """The block's content without trailing zeroes (``b""``: a hole)."""
        return self.blocks.get(index, b"")

    def write_block(self, index: int, data: bytes) -> None:
        if not 0 <= index < self.nblocks or len(data.rstrip(b"\0")) > self.block_len(index):
            raise ValueError(f"block {index} is outside {self.path}")
        data = data.rstrip(b"\0")
        if data:
            self.blocks[index] = data
        else:
            self.blocks.pop(index, None)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``offset`` .. ``offset + length`` (fewer at the end of the image)."""
        end = min(self.size, offset + length)
        out = bytearray()
        pos = offset
        while pos < end:
            index, skip = divmod(pos, self.block_size)
            take = min(end - pos, self.block_size - skip)
            block = self.read_block(index).ljust(self.block_len(index), b"\0")
            out += block[skip:skip + take]
            pos += take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (inside the image)."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write outside {self.path}")
        pos = 0
        while pos < len(data):
            index, skip = divmod(offset + pos, self.block_size)
            take = min(len(data) - pos, self.block_size - skip)
            block = bytearray(self.read_block(index).ljust(self.block_len(index), b"\0"))
            block[skip:skip + take] = data[pos:pos + take]
            self.write_block(index, bytes(block))
            pos += take

    @property
    def allocated(self) -> int:
        """Bytes allocated on the host (qcow2: plus its metadata)."""
        data = sum(self.block_len(i) for i in self.blocks)
        return data + (196_608 if self.format == "qcow2" else 0)

    def same_content(self, other: FakeImage) -> bool:
        """Same virtual size and the same bytes (formats may differ)."""
        return self.size == other.size and self.blocks == other.blocks

    def copy_blocks(self, source: FakeImage, blocks: Iterable[int] | None = None) -> int:
        """Copy ``blocks`` (None: all) of ``source`` into this image; the bytes of
        data among them (holes excluded)."""
        data = 0
        for index in range(source.nblocks) if blocks is None else sorted(blocks):
            if index >= self.nblocks:
                continue
            content = source.read_block(index)
            self.write_block(index, content)
            data += source.block_len(index) if content else 0
        return data


@dataclass
class GuestProfile:
    """How the guest of one VM behaves, whichever host runs it."""

    #: bytes of RAM a migration sends
    ram: int
    #: bytes/s the guest dirties while it runs
    dirty_rate: float = 0.0
    #: its working set (None: all RAM)
    wss: int | None = None
    #: it powers off when the ACPI power button is pressed
    acpi: bool = True


@dataclass(frozen=True)
class TlsObject:
    """A ``tls-creds-x509`` object of a VM."""

    id: str
    directory: str
    endpoint: Literal["client", "server"]


@dataclass(frozen=True)
class AuthzObject:
    """An ``authz-simple`` object of a VM: the one x509 DN it allows."""

    id: str
    identity: str


@dataclass(eq=False)
class FakeNode:
    """A block node of a VM: a disk (``disk0`` ...) or an NBD client."""

    name: str
    kind: Literal["disk", "nbd"]
    #: disk: its image (the object stays the process's even if the file is removed)
    image: FakeImage | None = None
    writable: bool = True
    #: disk: activated (QEMU owns it and the guest may write to it)
    active: bool = False
    # -- an NBD client
    address: NbdAddress | None = None
    export: str | None = None
    server_host: str | None = None
    server_pid: int | None = None
    tls_id: str | None = None
    #: why its connection is gone (cut), else None
    broken: str | None = None


@dataclass(frozen=True)
class FakeExport:
    """An NBD export of a VM's node."""

    id: str
    name: str
    node: str
    writable: bool
    bitmaps: tuple[str, ...] = ()


@dataclass(eq=False)
class FakeNbdServer:
    """A VM's NBD server and its exports (by export id)."""

    address: NbdAddress
    tls_id: str | None = None
    #: the authz object that decides which client certificate may connect
    tls_authz: str | None = None
    #: no new client while this many are connected (None: no limit)
    max_connections: int | None = None
    exports: dict[str, FakeExport] = field(default_factory=dict)

    def by_name(self, name: str) -> FakeExport | None:
        return next((e for e in self.exports.values() if e.name == name), None)


@dataclass(eq=False)
class FakeBitmap:
    """A dirty bitmap: the blocks the guest wrote to ``node`` while it was enabled."""

    node: str
    name: str
    enabled: bool = True
    blocks: set[int] = field(default_factory=set)


@dataclass(eq=False)
class FakeJob:
    """A block mirror job (``blockdev-mirror``, ``auto-dismiss`` off)."""

    id: str
    device: str
    target: str
    #: running | ready | aborting | concluded
    status: str = "running"
    ready: bool = False
    offset: int = 0
    length: int = 0
    error: str | None = None
    #: blocks still to copy (the first pass, then what the guest dirtied)
    pending: set[int] = field(default_factory=set)
    #: a soft cancel of a ready mirror: copy what is left, then conclude
    completing: bool = False
    #: a forced cancel (or a cancel before ready): conclude without copying more
    aborting: bool = False
    #: how it ended: completed | cancelled | failed
    outcome: str | None = None


@dataclass(frozen=True)
class PortUse:
    """Who holds a TCP port or a unix socket path on a host."""

    #: listen (incoming migration) | recover (post-copy recovery) | nbd | other
    kind: str
    vm: str | None = None
    pid: int | None = None
    #: the address bound (TCP) or the socket path
    address: str = ""


@dataclass(frozen=True)
class SplitBrain:
    """Two processes of one VM ran their guests at the same time."""

    tick: int
    vm: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class AckedWrite:
    """A guest write that was acknowledged and is not in the image checked."""

    seq: int
    block: int
    #: the record found in that block instead (None: none)
    found: int | None


@dataclass(eq=False)
class FakeVm:
    """One hypervisor process of a VM on a host, and what QEMU keeps in it."""

    pid: int
    name: str
    host: str
    spec: VMSpec
    #: running | paused | prelaunch | inmigrate | postmigrate | finish-migrate | shutdown
    run_state: str
    #: started ``-incoming defer`` and no migration completed into it yet
    incoming: bool = False
    #: QEMU's ``-S`` (autostart off): the guest runs only at :meth:`Monitor.resume`
    held: bool = False
    capabilities: dict[str, bool] = field(default_factory=dict)
    params: dict[str, object] = field(default_factory=dict)
    objects: dict[str, TlsObject | AuthzObject] = field(default_factory=dict)
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    nbd: FakeNbdServer | None = None
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    bitmaps: dict[tuple[str, str], FakeBitmap] = field(default_factory=dict)
    #: the guest's memory version: +1 at every tick it runs
    memory: int = 0
    #: the memory it started with (a fresh boot: 0; incoming: the source's at the switch)
    memory_at_start: int = 0
    #: the memory it had when a migration from it switched over (source side)
    memory_at_switch: int | None = None
    #: writes this process's guest acknowledged
    acked: int = 0
    #: boot | migration: how its guest came to be
    origin: Literal["boot", "migration"] = "boot"
    #: what a guest power-off does: poweroff | pause
    shutdown_action: str = "poweroff"
    #: ``announce`` calls with their arguments
    announcements: list[dict[str, int]] = field(default_factory=list)
    #: the URI its incoming migration listens on (until a source connected)
    listen_uri: str | None = None
    #: the URI it listens on to recover a paused post-copy
    recover_uri: str | None = None
    outgoing: FakeMigration | None = None
    incoming_migration: FakeMigration | None = None
    #: the process exists
    alive: bool = True
    #: the tick from which the guest handles a pressed power button
    powerdown_at: int | None = None
    #: a fresh boot whose guest has not run yet (prints its banner when it does)
    unbooted: bool = False
    #: the last activation error (a held destination whose disks could not be taken)
    activation_error: str | None = None
    #: the versioned machine type it runs, and the QEMU that runs it (the host's when
    #: it started: an upgrade of the host's QEMU later does not change it)
    machine: str = ""
    qemu: FakeQemu | None = None

    @property
    def exports(self) -> Mapping[str, FakeExport]:
        return self.nbd.exports if self.nbd is not None else {}

    @property
    def disk(self) -> FakeNode | None:
        """Its first disk (where the guest writes), if it has one."""
        node = self.nodes.get("disk0")
        return node if node is not None and node.kind == "disk" else None

    @property
    def migrating(self) -> bool:
        """A migration from or into it has not ended."""
        return any(m is not None and not m.ended for m in (self.outgoing, self.incoming_migration))


class FakeHost:
    """One fake hypervisor host: what the tests inspect.

    ``vms`` holds the VM processes the driver can find (one per VM name);
    ``orphans`` processes that still run though their runtime directory was removed
    (the driver no longer finds them: an engine bug); ``files`` every file by path
    (shared storage: the same object on every host that sees it); ``ports`` the TCP
    ports taken (migration listeners, NBD servers); ``sockets`` unix socket paths;
    ``consoles`` each VM's serial console log.
    """

    def __init__(self, config: HostConfig, *, capacity: int,
                 qemu_version: tuple[int, int, int]) -> None:
        self.config = config
        self.name = config.name
        self.vms: dict[str, FakeVm] = {}
        self.orphans: list[FakeVm] = []
        self.files: dict[str, FakeImage] = {}
        self.ports: dict[int, PortUse] = {}
        self.sockets: dict[str, PortUse] = {}
        self.consoles: dict[str, str] = {}
        #: False: the controller cannot reach the host (its VMs and links go on)
        self.reachable = True
        #: bytes of the filesystems holding its files
        self.capacity = capacity
        self.qemu_version = qemu_version
        #: what the host's QEMU binary offers (machine types, CPU models): QEMU 7.2 as
        #: captured with the host's accelerator; replace it to model another QEMU or CPU
        self.qemu: FakeQemu = captured_qemu(config.accel)

    @property
    def addresses(self) -> frozenset[str]:
        """The addresses this host answers on."""
        own = {self.config.address}
        if self.config.migration_address:
            own.add(self.config.migration_address)
        return frozenset(own)

    def processes(self) -> list[FakeVm]:
        """Every live process on the host, orphans included."""
        return [*self.vms.values(), *self.orphans]

    def __repr__(self) -> str:
        return f"FakeHost({self.name!r}, vms={sorted(self.vms)})"
