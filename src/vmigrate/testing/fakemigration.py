"""A fake QEMU pre-copy/post-copy migration, for testing convergence control.

The physics live in :mod:`vmigrate.plan.simulate` (the live migration
prediction runs the same simulation); this module keeps the names the tests
use: :class:`FakeMigration` is :class:`~vmigrate.plan.simulate.SimulatedMigration`
(pre-copy at ``min(link_rate, max-bandwidth)`` while the guest dirties
``dirty_rate`` bytes/s up to ``wss``, QEMU 7.2's auto-converge, post-copy,
QEMU's parameter range checks), :class:`FakeRun` is
:class:`~vmigrate.plan.simulate.SimRun`, and :func:`drive` samples a fake into
a controller every 0.5 s of simulated time and applies its actions.
"""

from __future__ import annotations

from vmigrate.plan.simulate import TERMINAL, SimRun, SimulatedMigration, drive, drive_sparse

FakeMigration = SimulatedMigration
FakeRun = SimRun

__all__ = ["TERMINAL", "FakeMigration", "FakeRun", "drive", "drive_sparse"]
