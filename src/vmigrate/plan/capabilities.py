"""The QEMU migration capabilities and parameters a live migration starts with (pure).

:func:`plan_setup` turns a convergence policy (:mod:`vmigrate.plan.policy`) plus
the command-line options (:class:`MigrationOptions`) into the QMP capabilities
and parameters to set **before** ``migrate`` (:class:`MigrationSetup`), and
refuses combinations the running QEMU cannot do
(:class:`~vmigrate.errors.SpecError`). :func:`throttle_parameters` gives what a
``throttle`` step sets while the migration runs.

QEMU facts this relies on (QEMU 7.2, checked against ``qapi/migration.json``
and on this machine's ``qemu-system-x86_64`` 7.2.22):

* Capabilities (``postcopy-ram``, ``auto-converge``, ``xbzrle``, ``multifd``)
  cannot change while a migration runs; parameters can. ``postcopy-ram`` must
  be on at both ends before ``migrate``.
* 7.2 does *not* refuse ``multifd`` with ``postcopy-ram`` when the
  capabilities are set: ``migrate-start-postcopy`` is accepted and the
  destination then dies on an assertion while the source reports
  ``completed``. ``multifd`` with ``xbzrle`` is accepted too, and XBZRLE is
  simply not used on multifd channels. Both are therefore refused here, before
  anything starts.
* Ranges: ``downtime-limit`` 0..2 000 000 ms (default 300),
  ``max-bandwidth`` bytes/s (default 128 MiB/s), ``cpu-throttle-initial`` and
  ``cpu-throttle-increment`` 1..99 (0 is refused), ``max-cpu-throttle``
  ``cpu-throttle-initial``..99, ``throttle-trigger-threshold`` 1..100 (since
  5.0), ``multifd-channels`` a uint8 (QEMU accepts 1; we ask for 2..255),
  ``xbzrle-cache-size`` a power of two.

The throttle trick
------------------
Because ``auto-converge`` cannot be switched on mid-migration, a policy with a
``throttle`` step enables it at the start *held*: ``cpu-throttle-initial=1``,
``cpu-throttle-increment=1``, ``max-cpu-throttle=1`` (an increment of 0 is
refused by QEMU, so the ceiling does the holding) and
``throttle-trigger-threshold=100`` (QEMU only considers throttling when the
guest dirtied more than 100 % of what was sent in a sync period). The guest
loses at most 1 % of its CPU time. The step then raises the ceiling and the
rates through ``migrate-set-parameters``: ``cpu-throttle-initial=value``,
``cpu-throttle-increment=max(5, value // 2)``, ``max-cpu-throttle=99``,
``throttle-trigger-threshold=50`` (QEMU's default). If the held throttle had
already engaged at 1 %, QEMU's next raise goes to ``1 + increment`` rather than
``value``: ``cpu-throttle-initial`` only applies when throttling starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from vmigrate.errors import SpecError
from vmigrate.plan.policy import MAX_DOWNTIME_MS, Policy, throttle_increment

__all__ = [
    "DEFAULT_THROTTLE_THRESHOLD",
    "HELD_THROTTLE",
    "UNLIMITED_BANDWIDTH",
    "MigrationOptions",
    "MigrationSetup",
    "plan_setup",
    "throttle_parameters",
]

#: what "no bandwidth cap" sets max-bandwidth to: 1 TiB/s, far above any link,
#: far below any integer overflow in QEMU's rate limiter
UNLIMITED_BANDWIDTH = 1 << 40
#: auto-converge enabled but held harmless until a throttle step (see module doc)
HELD_THROTTLE: Mapping[str, int] = {
    "cpu-throttle-initial": 1,
    "cpu-throttle-increment": 1,
    "max-cpu-throttle": 1,
    "throttle-trigger-threshold": 100,
}
#: QEMU's default trigger threshold, restored by a throttle step
DEFAULT_THROTTLE_THRESHOLD = 50


@dataclass(frozen=True)
class MigrationOptions:
    """What the user asked for: a policy and the command-line overrides."""

    policy: Policy
    #: overrides policy.downtime_ms
    downtime_ms: int | None = None
    #: bytes/s, overrides policy.bandwidth
    bandwidth: int | None = None
    #: multifd channels (>= 2), or None for one stream
    parallel: int | None = None
    #: zstd compresses multifd channels (needs parallel); xbzrle is its own capability
    compress: Literal["zstd", "xbzrle"] | None = None
    tls: bool = True
    #: the VM's tier allows post-copy (an adaptive policy plans it only then)
    postcopy_allowed: bool = True
    #: the most downtime the VM's tier accepts (ms); an adaptive policy stays within it
    max_downtime_ms: float | None = None


@dataclass(frozen=True)
class MigrationSetup:
    """What to set before ``migrate``; the engine applies it as given."""

    #: set on BOTH sides before migrate (same dict)
    capabilities: dict[str, bool]
    #: migrate-set-parameters arguments for the source (tls-creds is the engine's)
    parameters: dict[str, object]
    #: migrate-set-parameters arguments for the destination (multifd must match); may be empty
    dest_parameters: dict[str, object]
    #: postcopy-ram is enabled
    postcopy: bool


def throttle_parameters(initial: int, maximum: int = 99) -> dict[str, object]:
    """The parameters a throttle step sets (see the module doc's "throttle trick"),
    never throttling above ``maximum`` %."""
    return {
        "cpu-throttle-initial": min(initial, maximum),
        "cpu-throttle-increment": throttle_increment(initial),
        "max-cpu-throttle": maximum,
        "throttle-trigger-threshold": DEFAULT_THROTTLE_THRESHOLD,
    }


def _version(v: tuple[int, int, int]) -> str:
    return ".".join(str(x) for x in v)


def plan_setup(
    opts: MigrationOptions, qemu_version: tuple[int, int, int] = (7, 2, 0)
) -> MigrationSetup:
    """The capabilities and parameters a migration with ``opts`` starts with.

    ``postcopy-ram`` is enabled only when the policy has a ``postcopy`` step; a
    ``timeout_action = "complete"`` never enables it by itself (without it, or
    with ``--parallel``, completing means pausing the guest). ``auto-converge``
    is enabled, held at 1 %, when the policy has a ``throttle`` step. An adaptive
    policy gets both (post-copy only when ``postcopy_allowed`` and without
    ``--parallel``): its planner may need either at any pass.

    Raises :class:`SpecError` for what QEMU cannot do, with what to change:
    multifd (``--parallel``) with a post-copy step or with XBZRLE, zstd without
    ``--parallel``, ``--parallel`` outside 2..255, a downtime or bandwidth out of
    range, or a feature older than ``qemu_version``. Pure: nothing is changed on
    failure.
    """
    policy = opts.policy
    qv = _version(qemu_version)
    downtime = policy.downtime_ms if opts.downtime_ms is None else opts.downtime_ms
    if not 0 <= downtime <= MAX_DOWNTIME_MS:
        raise SpecError(f"downtime {downtime} ms: must be 0..{MAX_DOWNTIME_MS} ms")
    bandwidth = policy.bandwidth if opts.bandwidth is None else opts.bandwidth
    if bandwidth is not None and bandwidth < 1:
        raise SpecError(f"bandwidth {bandwidth} bytes/s: must be at least 1 byte/s")
    parallel = opts.parallel
    if parallel is not None and not 2 <= parallel <= 255:
        raise SpecError(
            f"--parallel {parallel}: use 2..255 multifd channels, or leave it out for one stream"
        )
    if opts.compress not in (None, "zstd", "xbzrle"):
        raise SpecError(f"--compress {opts.compress!r}: use zstd or xbzrle")
    if opts.compress == "zstd" and parallel is None:
        raise SpecError(
            "--compress zstd compresses multifd channels: add --parallel N (N >= 2), "
            "or use --compress xbzrle"
        )
    postcopy = policy.uses_postcopy
    throttle = policy.uses_throttle
    if policy.adaptive:
        # the planner may switch to post-copy or throttle at any pass: both are enabled
        # before migrate (capabilities cannot change later), post-copy only where it may
        # be used (the tier allows it, no multifd)
        postcopy = opts.postcopy_allowed and parallel is None
        throttle = True
    if parallel is not None:
        if postcopy:
            raise SpecError(
                f"policy {policy.name!r} switches to post-copy, which QEMU {qv} cannot combine "
                "with --parallel (multifd): drop --parallel, or pick a policy without a "
                "postcopy step (e.g. 'suspend')"
            )
        if opts.compress == "xbzrle":
            raise SpecError(
                f"QEMU {qv} cannot use --compress xbzrle with --parallel (multifd): "
                "use --compress zstd with --parallel, or drop --parallel"
            )
        if qemu_version < (4, 0, 0):
            raise SpecError(f"QEMU {qv} has no multifd: drop --parallel (needs QEMU 4.0)")
        if opts.compress == "zstd" and qemu_version < (5, 0, 0):
            raise SpecError(f"QEMU {qv} has no multifd zstd: drop --compress (needs QEMU 5.0)")

    capabilities = {
        "postcopy-ram": postcopy,
        "auto-converge": throttle,
        "xbzrle": opts.compress == "xbzrle",
        "multifd": parallel is not None,
    }
    parameters: dict[str, object] = {
        "downtime-limit": downtime,
        "max-bandwidth": UNLIMITED_BANDWIDTH if bandwidth is None else bandwidth,
    }
    if postcopy:
        # 0 = unlimited in QEMU; a user cap applies to the post-copy phase too
        parameters["max-postcopy-bandwidth"] = 0 if bandwidth is None else bandwidth
    if throttle:
        held = dict(HELD_THROTTLE)
        if qemu_version < (5, 0, 0):
            del held["throttle-trigger-threshold"]
        parameters.update(held)
    dest_parameters: dict[str, object] = {}
    if parallel is not None:
        multifd: dict[str, object] = {
            "multifd-channels": parallel,
            "multifd-compression": "zstd" if opts.compress == "zstd" else "none",
        }
        parameters.update(multifd)
        dest_parameters.update(multifd)
    return MigrationSetup(
        capabilities=capabilities,
        parameters=parameters,
        dest_parameters=dest_parameters,
        postcopy=postcopy,
    )

