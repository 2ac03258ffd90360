"""Convergence policies for live migration: the data, the built-ins, the inventory tables.

A :class:`Policy` is data (built in, or a ``[policies.NAME]`` table of the
inventory): a starting downtime limit, an optional bandwidth cap, a list of
:class:`Step` s that fire after so many *stalled* iterations, and a timeout.

* :data:`BUILTIN` holds the built-in policies by name (:data:`DEFAULT_POLICY`
  is used when none is named);
* :func:`load_policies` validates the inventory's tables and
  :func:`resolve_policy` finds a policy by name;
* :func:`describe` renders a policy in one line for reports.

Two pure pieces use a policy: :func:`vmigrate.plan.capabilities.plan_setup`
turns it, with the command-line options, into what QEMU is set to before
``migrate`` (and refuses what QEMU cannot do), and
:class:`vmigrate.plan.convergence.ConvergenceController` applies its steps to
``query-migrate`` samples (what *stalled* means is documented there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
from vmigrate.units import parse_rate

__all__ = [
    "BUILTIN",
    "DEFAULT_POLICY",
    "MAX_DOWNTIME_MS",
    "QEMU_DEFAULT_DOWNTIME_MS",
    "QEMU_DEFAULT_MAX_BANDWIDTH",
    "Policy",
    "Step",
    "describe",
    "load_policies",
    "parse_bandwidth",
    "resolve_policy",
    "throttle_increment",
]

#: QEMU's own defaults (7.2)
QEMU_DEFAULT_DOWNTIME_MS = 300
QEMU_DEFAULT_MAX_BANDWIDTH = 128 << 20
#: QEMU refuses a larger downtime-limit
MAX_DOWNTIME_MS = 2_000_000

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
    #: once the guest runs on the destination, QEMU announces its NICs (gratuitous
    #: RARP) this many times, the first after ``announce_initial_ms``, each next one
    #: ``announce_step_ms`` later than the one before, at most ``announce_max_ms`` apart,
    #: so switches learn the guest's new port even when the hosts are loaded
    #: plan the path from the models instead of following ``steps``
    #: (:mod:`vmigrate.plan.adaptive`): ``downtime_ms`` is then the most downtime the
    #: migration may take, and the controller chooses the lowest limit that converges
    adaptive: bool = False
    announce_rounds: int = Field(default=8, ge=1, le=100)
    announce_initial_ms: int = Field(default=50, ge=1, le=100_000)
    announce_step_ms: int = Field(default=100, ge=1, le=100_000)
    announce_max_ms: int = Field(default=550, ge=1, le=100_000)

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
        if self.adaptive and self.steps:
            raise ValueError("an adaptive policy plans its own steps: give it no steps")
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
            name="adaptive",
            description="Plans the path from the prediction models (the latest assessment, "
            "then what each pass measured): plain pre-copy at the lowest downtime limit that "
            "converges in good time, else the fastest of throttling, post-copy (where the "
            "tier allows it) or pausing, within a downtime of at most 300 ms; plans again "
            "after every pass; at 10 min force completion.",
            adaptive=True,
            downtime_ms=300,
            timeout_s=600,
            timeout_action="complete",
        ),
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
DEFAULT_POLICY = "adaptive"


# -- bandwidth ------------------------------------------------------------------------------

def parse_bandwidth(text: str) -> int:
    """A bandwidth cap (a policy's ``bandwidth``, ``--bandwidth``) in bytes per second.

    :func:`vmigrate.units.parse_rate`'s grammar: byte units are binary, as in QEMU
    (``"100M"``, ``"100MB"``, ``"100MiB/s"`` are 100 MiB/s; a bare number is
    bytes/s); bit units are decimal and must be spelled ``bit`` or ``bps``
    (``"800mbit"``, ``"1Gbit/s"``, ``"100mbps"``). Case does not matter. Raises
    :class:`SpecError` for anything else, zero, or a rate below 1 byte/s; nothing
    else happens on failure.
    """
    return parse_rate(text, what="bandwidth")


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


def throttle_increment(initial: int) -> int:
    """The CPU throttle increment of a throttle step starting at ``initial`` percent:
    ``max(5, initial // 2)``, never above 99."""
    return min(99, max(5, initial // 2))


def _describe_step(step: Step) -> str:
    if step.action == "downtime":
        return f"downtime {step.value} ms"
    if step.action == "throttle":
        assert step.value is not None
        return f"throttle CPUs {step.value}%+{throttle_increment(step.value)}%"
    return {"postcopy": "post-copy", "pause": "pause guest", "abort": "abort"}[step.action]


def describe(policy: Policy) -> str:
    """One line for reports.

    e.g. ``balanced: downtime 300 ms, no bandwidth cap; 2 stalls -> downtime 600 ms; ...``
    """
    cap = "no bandwidth cap" if policy.bandwidth is None else f"max {_human_rate(policy.bandwidth)}"
    if policy.adaptive:
        parts = [f"{policy.name}: adaptive, downtime at most {policy.downtime_ms} ms, {cap}; "
                 "the path is planned from the models and again after every pass"]
    else:
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

