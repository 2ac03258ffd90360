"""Convergence policies for live migration, and the controller that applies them.

A :class:`Policy` is data (built in, or a ``[policies.NAME]`` table of the
inventory): a starting downtime limit, an optional bandwidth cap, a list of
:class:`Step` s that fire after so many *stalled* iterations, and a timeout.

Three pure pieces use it:

* :func:`plan_setup` turns a policy plus the command-line options into the
  QMP capabilities and parameters to set **before** ``migrate``, and refuses
  combinations the running QEMU cannot do (:class:`~vmigrate.errors.SpecError`).
* :class:`ConvergenceController` is fed one :class:`Sample` per
  ``query-migrate`` reading and returns the :data:`Action` s to execute.
* :func:`describe` renders a policy in one line for reports.

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

Stalls
------
The controller looks at ``ram.remaining`` at every iteration end (the first
sample whose ``ram.dirty-sync-count`` is higher than before: right after the
sync, remaining is what the guest dirtied during the pass). An iteration is
*stalled* when that remaining is above ``stall_ratio`` times the best (lowest)
remaining seen at earlier iteration ends; the baseline before the first end is
the whole RAM. Samples come every ~0.5 s, so the first sample of a new iteration
may be well into it: the bytes sent since the sync are added back (estimated
from ``ram.transferred`` since the previous sample, less what the old pass
still had to send above QEMU's threshold of ``mbps`` x downtime limit). Several
syncs between two samples count as one iteration end, without that correction.
``stall_ratio = 0`` makes every iteration end with data left count as stalled,
so ``after_stalls`` becomes "after N completed iterations" (the ``postcopy``
built-in uses that).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vmigrate.errors import ConfigError, NotFoundError, SpecError

__all__ = [
    "BUILTIN",
    "DEFAULT_POLICY",
    "Abort",
    "Action",
    "ConvergenceController",
    "MigrationOptions",
    "MigrationSetup",
    "PauseGuest",
    "Policy",
    "Sample",
    "SetParameters",
    "StartPostcopy",
    "Step",
    "StepRecord",
    "describe",
    "load_policies",
    "parse_bandwidth",
    "plan_setup",
    "resolve_policy",
    "throttle_parameters",
]

#: QEMU's own defaults (7.2)
QEMU_DEFAULT_DOWNTIME_MS = 300
QEMU_DEFAULT_MAX_BANDWIDTH = 128 << 20
#: QEMU refuses a larger downtime-limit
MAX_DOWNTIME_MS = 2_000_000
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

StepAction = Literal["downtime", "throttle", "postcopy", "pause", "abort"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Frozen):
    """One rung of a convergence schedule.

    ``downtime`` needs ``value`` (the new limit, ms); ``throttle`` needs
    ``value`` (initial CPU throttle percent, 1..99; the increment is
    ``max(5, value // 2)``); the other actions take no value.
    """

    #: fire after this many stalled iterations since the previous step fired
    after_stalls: int = Field(ge=1)
    action: StepAction
    value: int | None = None

    @model_validator(mode="after")
    def _check_value(self) -> Step:
        if self.action == "downtime":
            if self.value is None or not 0 <= self.value <= MAX_DOWNTIME_MS:
                raise ValueError(f"a downtime step needs value = 0..{MAX_DOWNTIME_MS} (ms)")
        elif self.action == "throttle":
            if self.value is None or not 1 <= self.value <= 99:
                raise ValueError("a throttle step needs value = 1..99 (initial CPU throttle %)")
        elif self.value is not None:
            raise ValueError(f"a {self.action} step takes no value")
        return self


class Policy(_Frozen):
    """A convergence policy: start settings, a schedule of steps, a timeout."""

    name: str = Field(min_length=1)
    description: str = ""
    #: starting downtime limit, ms
    downtime_ms: int = Field(default=QEMU_DEFAULT_DOWNTIME_MS, ge=0, le=MAX_DOWNTIME_MS)
    #: bytes/s cap; None = no cap. A string ("100M", "800mbit") is parsed by parse_bandwidth.
    bandwidth: int | None = Field(default=None, gt=0)
    steps: tuple[Step, ...] = ()
    #: seconds since the migration started; inf = never
    timeout_s: float = Field(default=600, gt=0)
    #: at the timeout: cancel, or force completion (post-copy if enabled, else pause)
    timeout_action: Literal["abort", "complete"] = "abort"
    #: stalled = remaining at an iteration end > stall_ratio * best remaining so far
    stall_ratio: float = Field(default=0.95, ge=0, allow_inf_nan=False)

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _parse_bandwidth(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return parse_bandwidth(value)
            except SpecError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _abort_last(self) -> Policy:
        for step in self.steps[:-1]:
            if step.action == "abort":
                raise ValueError("an abort step must be the last step (nothing runs after it)")
        return self

    @property
    def uses_postcopy(self) -> bool:
        """The schedule has a post-copy step (so ``postcopy-ram`` is enabled)."""
        return any(step.action == "postcopy" for step in self.steps)

    @property
    def uses_throttle(self) -> bool:
        """The schedule has a throttle step (so ``auto-converge`` is enabled, held)."""
        return any(step.action == "throttle" for step in self.steps)


def _builtin() -> dict[str, Policy]:
    policies = [
        Policy(
            name="balanced",
            description="Pre-copy at a 50 ms limit (a converging guest pauses briefly); on "
            "stalls raise it to 300 ms, then 600 ms, then throttle the guest's CPUs, then "
            "switch to post-copy; at 10 min force completion.",
            downtime_ms=50,
            steps=(
                Step(after_stalls=1, action="downtime", value=300),
                Step(after_stalls=2, action="downtime", value=600),
                Step(after_stalls=2, action="throttle", value=20),
                Step(after_stalls=2, action="postcopy"),
            ),
            timeout_s=600,
            timeout_action="complete",
        ),
        Policy(
            name="minimal-downtime",
            description="Keep the pause under 50 ms: pre-copy at a 50 ms limit, switch to "
            "post-copy after 2 stalled iterations; cancel at 10 min rather than pause.",
            downtime_ms=50,
            steps=(Step(after_stalls=2, action="postcopy"),),
            timeout_s=600,
            timeout_action="abort",
        ),
        Policy(
            name="postcopy",
            description="One full pre-copy pass, then post-copy: the guest moves after the "
            "first iteration whatever its dirty rate (stall_ratio 0).",
            downtime_ms=300,
            steps=(Step(after_stalls=1, action="postcopy"),),
            stall_ratio=0.0,
            timeout_s=600,
            timeout_action="complete",
        ),
        Policy(
            name="suspend",
            description="No post-copy: pause the guest after 2 stalled iterations so the "
            "copy finishes with it stopped (long downtime, never cancelled).",
            downtime_ms=300,
            steps=(Step(after_stalls=2, action="pause"),),
            timeout_s=600,
            timeout_action="complete",
        ),
    ]
    return {p.name: p for p in policies}


#: the built-in policies by name
BUILTIN: dict[str, Policy] = _builtin()
DEFAULT_POLICY = "balanced"


# -- bandwidth ------------------------------------------------------------------------------

_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z/]*)\s*$")
_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_BIT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bandwidth(text: str) -> int:
    """Parse a rate into bytes per second.

    Byte units are binary, as in QEMU: ``"100M"``, ``"100MB"``, ``"100MiB/s"`` are
    100 MiB/s; a bare number is bytes/s. Bit units are decimal and must be
    spelled ``bit`` or ``bps``: ``"800mbit"``, ``"1Gbit/s"``, ``"100mbps"``.
    Case does not matter. Raises :class:`SpecError` for anything else, zero, or a
    rate below 1 byte/s; nothing else happens on failure.
    """
    match = _NUMBER.match(text)
    if match is None:
        raise SpecError(f"bandwidth {text!r}: expected a number with a unit, e.g. 100M or 800mbit")
    number = float(match.group(1))
    unit = match.group(2).lower().removesuffix("/s")
    if unit.endswith("bps"):
        scale: float | None = _BIT_UNITS.get(unit[:-3])
        scale = None if scale is None else scale / 8
    elif unit.endswith(("bits", "bit")):
        prefix = unit.removesuffix("s").removesuffix("bit")
        scale = _BIT_UNITS.get(prefix)
        scale = None if scale is None else scale / 8
    else:
        byte_scale = _BYTE_UNITS.get(unit)
        scale = None if byte_scale is None else float(byte_scale)
    if scale is None:
        raise SpecError(
            f"bandwidth {text!r}: unknown unit {match.group(2)!r} "
            "(use K/M/G/T for bytes, kbit/mbit/gbit or kbps/mbps/gbps for bits)"
        )
    value = round(number * scale)
    if value < 1:
        raise SpecError(f"bandwidth {text!r}: must be at least 1 byte/s")
    if value >= 1 << 63:
        raise SpecError(f"bandwidth {text!r}: too large")
    return value


def _human_rate(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:g} {unit}/s"
    return f"{value} B/s"


# -- policy tables --------------------------------------------------------------------------


def load_policies(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, Policy]:
    """Validate the inventory's ``[policies.NAME]`` tables.

    The table key is the policy's name (a ``name`` field, if given, must match).
    Raises :class:`ConfigError` naming the policy and the offending field at the
    first invalid table; nothing is returned then.
    """
    policies: dict[str, Policy] = {}
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"policy {name!r}: [policies.{name}] must be a table")
        data = dict(table)
        if data.setdefault("name", name) != name:
            raise ConfigError(f"policy {name!r}: name: must be {name!r} (the table key) or absent")
        try:
            policies[name] = Policy.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(table)"
            msg = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"policy {name!r}: {where}: {msg}") from exc
    return policies


def resolve_policy(name: str, user: Mapping[str, Policy]) -> Policy:
    """The policy called ``name``: the user's if defined, else the built-in.

    Raises :class:`NotFoundError` listing every known name.
    """
    if name in user:
        return user[name]
    if name in BUILTIN:
        return BUILTIN[name]
    known = ", ".join(sorted({*BUILTIN, *user}))
    raise NotFoundError(f"unknown convergence policy {name!r} (known: {known})")


def _describe_step(step: Step) -> str:
    if step.action == "downtime":
        return f"downtime {step.value} ms"
    if step.action == "throttle":
        assert step.value is not None
        return f"throttle CPUs {step.value}%+{_throttle_increment(step.value)}%"
    return {"postcopy": "post-copy", "pause": "pause guest", "abort": "abort"}[step.action]


def describe(policy: Policy) -> str:
    """One line for reports.

    e.g. ``balanced: downtime 300 ms, no bandwidth cap; 2 stalls -> downtime 600 ms; ...``
    """
    cap = "no bandwidth cap" if policy.bandwidth is None else f"max {_human_rate(policy.bandwidth)}"
    parts = [f"{policy.name}: downtime {policy.downtime_ms} ms, {cap}"]
    for i, step in enumerate(policy.steps):
        more = "" if i == 0 else " more"
        stalls = "stall" if step.after_stalls == 1 else "stalls"
        parts.append(f"{step.after_stalls}{more} {stalls} -> {_describe_step(step)}")
    if math.isinf(policy.timeout_s):
        parts.append("no timeout")
    else:
        parts.append(f"timeout {policy.timeout_s:g} s -> {policy.timeout_action}")
    if policy.stall_ratio != 0.95:
        parts.append(f"stall ratio {policy.stall_ratio:g}")
    return "; ".join(parts)


# -- setup ----------------------------------------------------------------------------------


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


def _throttle_increment(initial: int) -> int:
    return min(99, max(5, initial // 2))


def throttle_parameters(initial: int) -> dict[str, object]:
    """The parameters a throttle step sets (see the module doc's "throttle trick")."""
    return {
        "cpu-throttle-initial": initial,
        "cpu-throttle-increment": _throttle_increment(initial),
        "max-cpu-throttle": 99,
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
    is enabled, held at 1 %, when the policy has a ``throttle`` step.

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


# -- samples --------------------------------------------------------------------------------


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return default


def _float(value: object, default: float = 0.0) -> float:
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return default


def _opt_int(value: object) -> int | None:
    return None if value is None or isinstance(value, bool) else _int(value)


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` reading on the source."""

    #: seconds since perform started
    t: float
    #: setup|active|postcopy-active|postcopy-paused|completed|failed|cancelled|device|...
    status: str
    transferred: int
    remaining: int
    total: int
    #: ram.dirty-sync-count
    iteration: int
    #: pages/s (ram.dirty-pages-rate)
    dirty_rate: float
    page_size: int = 4096
    throttle_pct: int = 0
    mbps: float = 0.0
    #: QEMU's estimate while active (expected-downtime), ms
    expected_downtime_ms: int | None = None
    #: the real downtime once completed (downtime), ms
    downtime_ms: int | None = None
    postcopy_requests: int = 0

    @property
    def dirty_bytes_rate(self) -> float:
        """Bytes per second the guest dirties."""
        return self.dirty_rate * self.page_size

    @classmethod
    def from_query_migrate(cls, t: float, reply: Mapping[str, Any]) -> Sample:
        """Build a sample from ``query-migrate``'s return value (or the whole reply).

        Missing or ill-typed fields read as zero/None: the ``setup`` phase has no
        ``ram``, and a never-started migration has no ``status`` (``"none"``).
        """
        body: Mapping[str, Any] = reply
        inner = reply.get("return")
        if isinstance(inner, Mapping):
            body = inner
        ram = body.get("ram")
        if not isinstance(ram, Mapping):
            ram = {}
        status = body.get("status")
        return cls(
            t=t,
            status=status if isinstance(status, str) else "none",
            transferred=_int(ram.get("transferred")),
            remaining=_int(ram.get("remaining")),
            total=_int(ram.get("total")),
            iteration=_int(ram.get("dirty-sync-count")),
            dirty_rate=_float(ram.get("dirty-pages-rate")),
            page_size=_int(ram.get("page-size"), 4096) or 4096,
            throttle_pct=_int(body.get("cpu-throttle-percentage")),
            mbps=_float(ram.get("mbps")),
            expected_downtime_ms=_opt_int(body.get("expected-downtime")),
            downtime_ms=_opt_int(body.get("downtime")),
            postcopy_requests=_int(ram.get("postcopy-requests")),
        )


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetParameters:
    """Run ``migrate-set-parameters`` on the source with ``params``."""

    params: dict[str, object]
    why: str


@dataclass(frozen=True)
class StartPostcopy:
    """Run ``migrate-start-postcopy`` on the source."""

    why: str


@dataclass(frozen=True)
class PauseGuest:
    """Stop the source guest (``stop``) so the remaining pages stop changing."""

    why: str


@dataclass(frozen=True)
class Abort:
    """Cancel the migration (``migrate_cancel``); the source keeps running."""

    why: str


Action = SetParameters | StartPostcopy | PauseGuest | Abort


@dataclass(frozen=True)
class StepRecord:
    """One thing the controller did (or skipped), for the report."""

    t: float
    iteration: int
    #: downtime|throttle|postcopy|pause|abort, or "timeout"
    action: str
    detail: str
    #: index into policy.steps; None for the timeout
    step: int | None = None
    #: False when the step was skipped (detail says why)
    taken: bool = True


_TERMINAL = frozenset({"completed", "failed", "cancelled", "cancelling"})


class ConvergenceController:
    """Turns ``query-migrate`` samples into actions, by the policy.

    Feed every sample to :meth:`observe` in time order and execute what it
    returns, in order. The controller only reads samples; if an action fails
    to execute, the controller does not know and will not retry it (one-shot
    actions are emitted at most once each).
    """

    def __init__(self, setup_opts: MigrationOptions, setup: MigrationSetup) -> None:
        self._policy = setup_opts.policy
        self._setup = setup
        limit = setup.parameters.get("downtime-limit", self._policy.downtime_ms)
        self._downtime = limit if isinstance(limit, int) else self._policy.downtime_ms
        self._next = 0
        self._since_step = 0
        self._stalls = 0
        self._last_iteration: int | None = None
        self._best: int | None = None
        self._prev: Sample | None = None
        self._done: set[str] = set()
        self._timed_out = False
        self._history: list[StepRecord] = []

    def initial_parameters(self) -> dict[str, object]:
        """The source parameters to set before ``migrate`` (a copy of the setup's)."""
        return dict(self._setup.parameters)

    @property
    def history(self) -> list[StepRecord]:
        """Every step taken or skipped, and the timeout, in order (a copy)."""
        return list(self._history)

    @property
    def stalls(self) -> int:
        """Stalled iterations seen so far."""
        return self._stalls

    def observe(self, sample: Sample) -> list[Action]:
        """Take one sample; return the actions to execute now (often none)."""
        if "abort" in self._done or sample.status in _TERMINAL:
            return []
        actions: list[Action] = []
        if sample.status == "active":
            actions += self._track(sample)
        if "abort" in self._done:  # a step aborted: the timeout has nothing left to do
            return actions
        if not self._timed_out and sample.t >= self._policy.timeout_s:
            actions += self._timeout(sample)
        return actions

    # -- stalls and steps

    def _track(self, sample: Sample) -> list[Action]:
        if self._last_iteration is None or self._best is None:
            self._last_iteration = sample.iteration
            self._prev = sample
            # before the first iteration end, the baseline is the whole RAM
            first = sample.iteration <= 1
            self._best = max(sample.total, sample.remaining) if first else sample.remaining
            return []
        prev, self._prev = self._prev, sample
        if sample.iteration <= self._last_iteration:
            return []
        synced_once = sample.iteration == self._last_iteration + 1
        self._last_iteration = sample.iteration
        remaining = sample.remaining
        if synced_once and prev is not None:
            remaining += self._sent_since_sync(prev, sample)
        stalled = remaining > self._policy.stall_ratio * self._best
        self._best = min(self._best, remaining)
        if not stalled:
            return []
        self._stalls += 1
        self._since_step += 1
        steps = self._policy.steps
        if self._next >= len(steps) or self._since_step < steps[self._next].after_stalls:
            return []
        index = self._next
        self._next += 1
        self._since_step = 0
        action = self._fire(index, steps[index], sample)
        return [] if action is None else [action]

    def _sent_since_sync(self, prev: Sample, sample: Sample) -> int:
        """Estimate of the bytes sent between the sync and ``sample``.

        QEMU syncs once the pass has less left than its threshold (measured
        bandwidth x downtime limit); of what was sent since ``prev``, the part
        beyond ``prev.remaining - threshold`` belongs to the new pass.
        """
        threshold = prev.mbps * 125_000 * self._downtime / 1000
        before_sync = max(0.0, prev.remaining - threshold)
        return max(0, int(sample.transferred - prev.transferred - before_sync))

    def _record(self, sample: Sample, action: str, detail: str, step: int | None,
                taken: bool = True) -> None:
        self._history.append(StepRecord(
            t=sample.t, iteration=sample.iteration, action=action, detail=detail,
            step=step, taken=taken,
        ))

    def _fire(self, index: int, step: Step, sample: Sample) -> Action | None:
        why = f"{self._since_step_text(step)} (step {index + 1} of {self._policy.name!r})"
        skip: str | None = None
        action: Action | None = None
        if step.action == "downtime":
            assert step.value is not None
            if step.value <= self._downtime:
                skip = f"downtime limit is already {self._downtime} ms"
            else:
                self._downtime = step.value
                action = SetParameters({"downtime-limit": step.value},
                                       f"{why}: raise downtime limit to {step.value} ms")
        elif step.action == "throttle":
            assert step.value is not None
            if not self._setup.capabilities.get("auto-converge", False):
                skip = "auto-converge was not enabled before the migration started"
            else:
                action = SetParameters(throttle_parameters(step.value),
                                       f"{why}: throttle guest CPUs from {step.value}%")
        elif step.action == "postcopy":
            if not self._setup.postcopy:
                skip = "postcopy-ram was not enabled before the migration started"
            elif "postcopy" in self._done:
                skip = "already in post-copy"
            else:
                action = StartPostcopy(f"{why}: switch to post-copy")
        elif step.action == "pause":
            if "postcopy" in self._done:
                skip = "the guest already runs on the destination (post-copy)"
            elif "pause" in self._done:
                skip = "the guest is already paused"
            else:
                action = PauseGuest(f"{why}: pause the guest to finish the copy")
        else:
            action = Abort(f"{why}: cancel the migration")
        if action is None:
            self._record(sample, step.action, f"skipped: {skip}", index, taken=False)
            return None
        self._done.add(step.action)
        self._record(sample, step.action, action.why, index)
        return action

    @staticmethod
    def _since_step_text(step: Step) -> str:
        return f"{step.after_stalls} stalled iteration{'s' if step.after_stalls != 1 else ''}"

    # -- timeout

    def _timeout(self, sample: Sample) -> list[Action]:
        status = sample.status
        limit = f"timeout after {self._policy.timeout_s:g} s"
        if status.startswith("postcopy") or "postcopy" in self._done:
            self._timed_out = True
            self._record(sample, "timeout", f"{limit}: in post-copy, cannot cancel; "
                         "waiting for it to finish", None, taken=False)
            return []
        if status not in ("setup", "active"):
            return []  # switching over right now: look again at the next sample
        self._timed_out = True
        action: Action | None = None
        if self._policy.timeout_action == "abort":
            action = Abort(f"{limit}: cancel the migration")
            self._done.add("abort")
        elif self._setup.postcopy:
            action = StartPostcopy(f"{limit}: force completion by post-copy")
            self._done.add("postcopy")
        elif "pause" not in self._done:
            action = PauseGuest(f"{limit}: force completion by pausing the guest")
            self._done.add("pause")
        if action is None:
            self._record(sample, "timeout", f"{limit}: guest already paused; waiting", None,
                         taken=False)
            return []
        self._record(sample, "timeout", action.why, None)
        return [action]
