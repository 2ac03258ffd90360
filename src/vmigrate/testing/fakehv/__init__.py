"""An in-memory QEMU/KVM cluster behind the hypervisor and transfer seams.

:class:`FakeCluster` holds fake hosts; :meth:`FakeCluster.driver` gives each one a
:class:`FakeDriver` (:class:`vmigrate.drivers.base.Driver`), whose
:meth:`~FakeDriver.monitor` gives a :class:`FakeMonitor` per VM
(:class:`vmigrate.drivers.base.Monitor`), and :attr:`FakeCluster.mover` is a
:class:`FakeMover` (:class:`vmigrate.transfer.mover.Mover`). The migration engine's
unit tests run every mode and phase against them, with injected faults, in
milliseconds: no root, QEMU or network, no real sleeping, deterministic::

    cluster = FakeCluster([h1, h2])             # HostConfigs (or an Inventory)
    cluster.add_vm("h1", spec, dirty_rate=20e6)
    cluster.inject(Fault("connection", host="h2", call="listen", after=True))
    ...  # run the engine on cluster.driver("h1"), cluster.driver("h2"), cluster.mover
    assert cluster.split_brain == [] and cluster.lost_writes(spec.name) == []

Time
    A global ``tick`` advances at every driver, monitor and mover call (each async
    method; ``Driver.monitor`` and ``Monitor.events`` are not calls). At every tick
    each guest that runs writes once: its memory version (``FakeVm.memory``) and
    its ``acked`` count go up, and it writes a record of its write number into a
    block of its first disk (when it has one and the disk is writable and active).
    A migration moves on only when a ``migration()`` is asked of either end
    (``sample_s`` simulated seconds per call, physics by
    :class:`~vmigrate.plan.simulate.SimulatedMigration`), a mirror only when
    ``block_jobs()`` is asked (``mirror_piece`` blocks per call).
    :attr:`FakeCluster.time` counts simulated seconds and :meth:`FakeCluster.sleep`
    can stand in for an engine's sleep.

Invariants the tests assert
    (a) ``split_brain`` stays empty: no two processes of one VM ran their guests at
    once; (b) :meth:`FakeCluster.lost_writes` is empty: the image the VM uses holds
    every write its guest acknowledged, on any host; (c) a destination guest
    starts with the source's memory at the switch (``FakeVm.memory_at_start`` equals
    the source's ``memory_at_switch``). ``FakeHost.orphans`` stays empty too: a VM
    process whose runtime directory was removed while it ran.

Faults
    :class:`Fault` and :meth:`FakeCluster.inject` (command errors, lost
    connections, unreachable hosts, a controller crash, a cancel request; before or
    after the effect); :meth:`FakeCluster.link_down` cuts a link between two hosts
    the way a real cut does (no error: nothing moves);
    :meth:`FakeCluster.set_reachable` takes a host away from the controller.

Machine types and CPU models
    Each host's QEMU (``FakeHost.qemu``, a :class:`FakeQemu`) answers the probe's
    questions from what QEMU 7.2 said on this project's machine (under the host's
    accelerator: TCG, or a nested KVM that lacks SSE3 and beyond). A VM process keeps
    the QEMU and the versioned machine type it started with. Starting a VM whose
    machine type or CPU model the host's QEMU does not know fails as QEMU fails
    (``VmStartError``); ``FakeQemu.without_machines`` and ``FakeQemu.lacking`` model an
    older QEMU and an older CPU.

What holds after a failure
    A refused call (``QmpCommandError``, ``ConflictError``, ``SpecError``,
    ``VmStartError``, a ``TransferError`` raised before the copy began) and a call
    hit by a fault before its effect changed nothing; time still passed (one tick).
    A fault with ``after`` strikes once the effect happened. A copy that failed
    part-way keeps what it wrote in the partial target, and the same copy resumes.
"""

from vmigrate.testing.fakehv._cluster import KNOWN_CAPABILITIES, FakeBackend, FakeCluster
from vmigrate.testing.fakehv._driver import FakeDriver, vm_state_of
from vmigrate.testing.fakehv._faults import Call, ControllerCrash, Fault, FaultKind, Side
from vmigrate.testing.fakehv._migration import FakeMigration
from vmigrate.testing.fakehv._model import (
    AckedWrite,
    AuthzObject,
    FakeBitmap,
    FakeExport,
    FakeHost,
    FakeImage,
    FakeJob,
    FakeNbdServer,
    FakeNode,
    FakeVm,
    GuestProfile,
    PortUse,
    SplitBrain,
    TlsObject,
    guest_record,
    parse_record,
)
from vmigrate.testing.fakehv._monitor import FakeEventWaiter, FakeMonitor
from vmigrate.testing.fakehv._mover import CopyRecord, FakeMover
from vmigrate.testing.fakehv._qemu import FakeQemu, captured_qemu

__all__ = [
    "KNOWN_CAPABILITIES",
    "AckedWrite",
    "AuthzObject",
    "Call",
    "ControllerCrash",
    "CopyRecord",
    "FakeBackend",
    "FakeBitmap",
    "FakeCluster",
    "FakeDriver",
    "FakeEventWaiter",
    "FakeExport",
    "FakeHost",
    "FakeImage",
    "FakeJob",
    "FakeMigration",
    "FakeMonitor",
    "FakeMover",
    "FakeNbdServer",
    "FakeNode",
    "FakeQemu",
    "FakeVm",
    "Fault",
    "FaultKind",
    "GuestProfile",
    "PortUse",
    "Side",
    "SplitBrain",
    "TlsObject",
    "captured_qemu",
    "guest_record",
    "parse_record",
    "vm_state_of",
]
