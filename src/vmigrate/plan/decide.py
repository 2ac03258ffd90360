"""The decision matrix: which migration mode, by weighted criteria, within a tier's rules.

:func:`decide` takes the per-mode predictions (:mod:`vmigrate.plan.predict`), the
assessment they came from and the planning settings, scores every mode 0..10 on
five criteria, weighs them, and returns a :class:`Decision` an operator can read:
the chosen mode, every mode's row, and a few sentences saying why.

The criteria and their default weights, as migration planners use them
(``[planning.weights]`` in ``vmigrate.toml`` changes them; they are normalised to
sum 1, so percentages work as well as fractions)::

    business_continuity  0.30   bandwidth_cost  0.25   storage_impact  0.20
    maturity             0.15   security        0.10

Scores are derived, never typed in (``d`` = predicted downtime in ms, figures
from :class:`~vmigrate.plan.assessment.ModePrediction`):

business continuity
    ``10 - 2.5 * log10(d / 100)`` clipped to 0..10 (100 ms or less -> 10, 1 s ->
    7.5, 10 s -> 5, 100 s -> 2.5, 1000 s -> 0); minus :data:`POSTCOPY_PENALTY`
    when post-copy is predicted (a link failure during post-copy stops the guest
    until the link is back and recovery runs); 0 when the convergence policy is
    predicted to abort.
network bandwidth cost
    ``10 - 2.5 * log2(b / least)`` clipped to 0..10, ``b`` the predicted wire
    bytes and ``least`` the fewest of the feasible modes that are not predicted
    to abort (both floored at :data:`BYTES_FLOOR`, so zero bytes divide nothing):
    the cheapest -> 10, twice as much -> 7.5, 4x -> 5, 16x -> 0.
storage performance impact
    How long the *running* guest's disks are under copy load, ``c`` seconds:
    ``10 / (1 + c / 60)``. live moves memory only (shared storage): ``c = 0``;
    cold copies while the guest is stopped: ``c = 0``; online (mirror) and warm
    (base copy and rounds) copy while it runs: ``c = total_time_s - d / 1000``.
    online is further divided by ``1 + w / link`` (``w`` the guest's disk write
    rate): the mirror writes every guest write to the destination too.
technology maturity
    A base from how established the technique is on the source's QEMU
    (:func:`maturity_base`): pre-copy 9, post-copy 6 (4 before QEMU 3.0, which
    cannot recover a broken post-copy), online NBD + ``blockdev-mirror`` 7 (5
    before 2.6), cold 10, warm 7 (5 before 4.0, when the dirty-bitmap commands
    were still experimental). Blended with vmigrate's own record for the mode
    when there is one: ``0.5 * base + 0.5 * 10 * (completed + 1) / (total + 2)``.
security and compliance
    cold and warm always stream through the transfer engine's AES-256-GCM: 10.
    live and online: 10 when both hosts hold TLS credentials for QEMU's stream,
    else :data:`PLAINTEXT_SCORE` (memory and disks in plain text on the
    migration network).

A mode is a *candidate* when it is feasible, its tier allows it (mode list,
encryption, maximum downtime) and the policy is not predicted to abort it. The
chosen mode is the candidate with the highest weighted total; ties go to the
lower predicted downtime. No candidate: ``chosen`` is None and the explanation
says why (the caller turns that into an error).

Tiers map workloads to rules (``[tiers.NAME]``): the built-in L1 (core systems:
cold or warm, audited), L2 (online) and L3 (live with prediction, or online)
match no VM until the inventory gives them ``vms`` globs. A table named like a
built-in tier overrides its fields; another name defines a new tier. A VM gets
the first tier whose globs match, built-ins first (L1, L2, L3) then new tiers in
inventory order, else ``[planning] default_tier``, else none (every mode
allowed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmigrate import validate
from vmigrate.errors import ConfigError
from vmigrate.plan.assessment import MODES, Assessment, Mode, ModePrediction

__all__ = [
    "BUILTIN_TIERS",
    "CRITERIA",
    "Criterion",
    "Decision",
    "PlanningConfig",
    "Row",
    "Score",
    "Tier",
    "Weights",
    "decide",
    "load_planning",
    "maturity_base",
    "tier_for",
]

Criterion = Literal[
    "business_continuity", "bandwidth_cost", "storage_impact", "maturity", "security"
]
CRITERIA: tuple[Criterion, ...] = (
    "business_continuity", "bandwidth_cost", "storage_impact", "maturity", "security"
)
#: how the explanation names each criterion
LABELS: Mapping[Criterion, str] = {
    "business_continuity": "business continuity",
    "bandwidth_cost": "network bandwidth cost",
    "storage_impact": "storage performance impact",
    "maturity": "technology maturity",
    "security": "security and compliance",
}

#: points business continuity loses when post-copy is predicted
POSTCOPY_PENALTY = 3.0
#: security score of a live/online stream without TLS
PLAINTEXT_SCORE = 2.0
#: byte counts below this count as this (no division by zero, tiny differences ignored)
BYTES_FLOOR = 1 << 20
#: seconds of copy load on the running guest that halve the storage score
COPY_HALF_S = 60.0
#: a runner-up this close (weighted points) makes the choice a close call
CLOSE_CALL = 0.5


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- settings -------------------------------------------------------------------------------


class Weights(_Frozen):
    """The criteria's weights; non-negative, not all zero, normalised when used."""

    business_continuity: float = Field(default=0.30, ge=0, allow_inf_nan=False)
    bandwidth_cost: float = Field(default=0.25, ge=0, allow_inf_nan=False)
    storage_impact: float = Field(default=0.20, ge=0, allow_inf_nan=False)
    maturity: float = Field(default=0.15, ge=0, allow_inf_nan=False)
    security: float = Field(default=0.10, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _some_weight(self) -> Weights:
        if self.total() <= 0:
            raise ValueError("at least one weight must be above 0")
        return self

    def get(self, criterion: Criterion) -> float:
        return float(getattr(self, criterion))

    def total(self) -> float:
        return sum(self.get(c) for c in CRITERIA)

    def normalised(self) -> Weights:
        """The same weights scaled to sum 1."""
        total = self.total()
        return Weights(**{c: self.get(c) / total for c in CRITERIA})


class Tier(_Frozen):
    """A class of workloads and the rules its migrations follow."""

    name: str = Field(min_length=1)
    description: str = ""
    #: fnmatch globs of VM names (case-sensitive); none = matches no VM
    vms: tuple[str, ...] = ()
    #: the modes a migration of this tier may use
    modes: tuple[Mode, ...] = Field(default=MODES, min_length=1)
    #: a mode predicted to pause the guest longer than this is not allowed
    max_downtime_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: replaces [planning.weights] for this tier (keys not given keep the planning values)
    weights: Weights | None = None
    #: the migration must be audited (every vmigrate migration is; recorded for the record)
    require_audit: bool = False
    #: live/online without TLS credentials (plain text) are not allowed
    require_encryption: bool = False
    #: the memory migration may switch to post-copy (the guest then runs on the
    #: destination before all its memory is there: a failed link loses it)
    postcopy: bool = True

    @field_validator("vms")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not glob for glob in value):
            raise ValueError("an empty glob matches nothing; remove it")
        return value

    @field_validator("modes")
    @classmethod
    def _unique(cls, value: tuple[Mode, ...]) -> tuple[Mode, ...]:
        return tuple(dict.fromkeys(value))

    def matches(self, vm: str) -> bool:
        return validate.name_matches(vm, self.vms)


def _builtin_tiers() -> dict[str, Tier]:
    tiers = [
        Tier(name="L1", description="core systems: cold or warm, audited",
             modes=("cold", "warm"), require_audit=True),
        Tier(name="L2", description="important systems: online", modes=("online",)),
        Tier(name="L3", description="other systems: live with prediction, or online",
             modes=("live", "online")),
    ]
    return {t.name: t for t in tiers}


#: the built-in tiers by name; they match no VM until the inventory gives them globs
BUILTIN_TIERS: dict[str, Tier] = _builtin_tiers()


class PlanningConfig(_Frozen):
    """The decision matrix's settings: weights, tiers (in match order), a default tier."""

    weights: Weights = Field(default_factory=Weights)
    tiers: tuple[Tier, ...] = tuple(BUILTIN_TIERS.values())
    #: the tier of a VM no tier's globs match; None = no tier (every mode allowed)
    default_tier: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PlanningConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        if self.default_tier is not None and self.default_tier not in names:
            raise ValueError(
                f"unknown tier {self.default_tier!r} (known: {', '.join(names) or 'none'})"
            )
        return self

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)


class _PlanningTable(_Frozen):
    weights: Weights = Field(default_factory=Weights)
    default_tier: str | None = None


def _config_error(what: str, exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(table)"
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{what}: {where}: {msg}")


def load_planning(
    planning: Mapping[str, Any], tiers: Mapping[str, Mapping[str, Any]]
) -> PlanningConfig:
    """Validate the inventory's ``[planning]`` table and ``[tiers.NAME]`` tables.

    ``[planning]`` takes ``weights`` (a table; keys not given keep their defaults)
    and ``default_tier``. A tier table named like a built-in tier overrides the
    fields it gives; its ``weights`` keys not given keep the planning weights.
    Raises :class:`ConfigError` naming the table and the offending field at the
    first invalid one; nothing is returned then.
    """
    try:
        table = _PlanningTable.model_validate(dict(planning))
    except ValidationError as exc:
        raise _config_error("planning", exc) from exc
    result = dict(BUILTIN_TIERS)
    for name, raw in tiers.items():
        if not isinstance(raw, Mapping):
            raise ConfigError(f"tier {name!r}: [tiers.{name}] must be a table")
        data = dict(raw)
        if data.setdefault("name", name) != name:
            raise ConfigError(f"tier {name!r}: name: must be {name!r} (the table key) or absent")
        if name in BUILTIN_TIERS:
            data = {**BUILTIN_TIERS[name].model_dump(), **data}
        weights = data.get("weights")
        if isinstance(weights, Mapping):
            data["weights"] = {**table.weights.model_dump(), **weights}
        try:
            result[name] = Tier.model_validate(data)
        except ValidationError as exc:
            raise _config_error(f"tier {name!r}", exc) from exc
    try:
        return PlanningConfig(weights=table.weights, tiers=tuple(result.values()),
                              default_tier=table.default_tier)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"planning: default_tier: {msg}") from exc


def tier_for(vm: str, config: PlanningConfig) -> Tier | None:
    """The first tier whose globs match ``vm``, else the default tier, else None."""
    for tier in config.tiers:
        if tier.matches(vm):
            return tier
    if config.default_tier is not None:
        return config.tier(config.default_tier)
    return None


# -- the decision ---------------------------------------------------------------------------


class Score(_Frozen):
    """One criterion's score for one mode."""

    value: float = Field(ge=0, le=10)
    #: one line: how the value came about
    reason: str
    #: the figure behind it, short, for comparisons ("downtime 45 ms")
    figure: str


class Row(_Frozen):
    """One mode in the matrix."""

    mode: Mode
    #: the prediction says the mode can run
    feasible: bool
    #: the tier allows it (mode list, encryption, maximum downtime)
    allowed: bool
    #: feasible, allowed and not predicted to abort: the mode can be chosen
    candidate: bool
    #: why it is not a candidate
    reason: str | None = None
    postcopy: bool = False
    downtime_ms: float | None = None
    wire_bytes: int | None = None
    #: per criterion (empty when not feasible)
    scores: dict[Criterion, Score] = Field(default_factory=dict)
    #: the weighted total, 0..10 (None when not feasible)
    total: float | None = None


class Decision(_Frozen):
    """The matrix for one VM, the chosen mode and why."""

    vm: str
    #: the VM's tier, None when none applies
    tier: str | None
    #: the tier requires an audited migration (every vmigrate migration is audited)
    audit: bool = False
    #: the weights used, normalised (sum 1)
    weights: Weights
    #: one per mode, in MODES order
    rows: tuple[Row, ...]
    chosen: Mode | None
    runner_up: Mode | None = None
    #: sentences for the operator
    explanation: tuple[str, ...]

    def row(self, mode: Mode) -> Row:
        for row in self.rows:
            if row.mode == mode:
                return row
        raise KeyError(mode)


def _clip(value: float) -> float:
    return min(10.0, max(0.0, value))


def _fmt_ms(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.3g} s"
    return f"{ms / 60_000:.3g} min"


def _fmt_s(seconds: float) -> str:
    return _fmt_ms(seconds * 1000)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_mode(mode: Mode, postcopy: bool) -> str:
    return f"{mode} (post-copy)" if postcopy else mode


def _dirty_phrase(assessment: Assessment) -> str | None:
    rate = assessment.dirty_rate
    if rate <= 0:
        return None
    text = f"the guest dirties {_fmt_bytes(rate)}/s"
    if assessment.link is not None:
        ratio = rate / assessment.link.bandwidth
        text += f", {ratio:.2g}x the {_fmt_bytes(assessment.link.bandwidth)}/s link"
    return text


def _business_continuity(pred: ModePrediction, downtime_ms: float) -> Score:
    if pred.aborts:
        return Score(value=0.0, figure="predicted to abort",
                     reason="the convergence policy is predicted to abort: it would not finish")
    value = 10.0 if downtime_ms <= 100 else _clip(10 - 2.5 * math.log10(downtime_ms / 100))
    reason = f"downtime {_fmt_ms(downtime_ms)} predicted ({value:.2f})"
    figure = f"downtime {_fmt_ms(downtime_ms)}"
    if pred.postcopy:
        value = max(0.0, value - POSTCOPY_PENALTY)
        reason += (f"; post-copy -{POSTCOPY_PENALTY:g}: a link failure during post-copy "
                   "stops the guest until recovery")
        figure += " with post-copy"
    return Score(value=value, reason=reason, figure=figure)


def _bandwidth(wire_bytes: int, least: int, least_mode: Mode) -> Score:
    ratio = max(wire_bytes, BYTES_FLOOR) / max(least, BYTES_FLOOR)
    value = _clip(10 - 2.5 * math.log2(ratio)) if ratio > 1 else 10.0
    figure = f"wire bytes {_fmt_bytes(wire_bytes)}"
    if ratio <= 1:
        reason = f"{_fmt_bytes(wire_bytes)} on the wire, the least of the feasible modes"
    else:
        reason = (f"{_fmt_bytes(wire_bytes)} on the wire, {ratio:.2f}x the least "
                  f"({_fmt_bytes(least)}, {least_mode})")
    return Score(value=value, reason=reason, figure=figure)


def _storage(pred: ModePrediction, assessment: Assessment, total_s: float,
             downtime_ms: float) -> Score:
    mode = pred.mode
    if mode == "live":
        return Score(value=10.0, figure="copy while running 0 s",
                     reason="live moves memory only: the disks stay on shared storage")
    if mode == "cold":
        return Score(value=10.0, figure="copy while running 0 s",
                     reason="the guest is stopped while its disks are copied")
    copy_s = max(0.0, total_s - downtime_ms / 1000)
    value = 10 / (1 + copy_s / COPY_HALF_S)
    what = "mirrored" if mode == "online" else "copied in rounds"
    figure = f"copy while running {_fmt_s(copy_s)}"
    reason = f"disks {what} for {_fmt_s(copy_s)} while the guest runs"
    if mode == "online" and assessment.link is not None:
        share = assessment.disk_write_rate / assessment.link.bandwidth
        value /= 1 + share
        if share >= 0.05:
            reason += (f"; the guest writes {_fmt_bytes(assessment.disk_write_rate)}/s, "
                       f"{share:.0%} of the link, and the mirror repeats every write")
    return Score(value=_clip(value), reason=reason, figure=figure)


def maturity_base(mode: Mode, postcopy: bool, qemu: tuple[int, int, int] | None) -> float:
    """How established the technique is on QEMU ``qemu`` (None = unknown), 0..10."""
    def before(major: int, minor: int) -> bool:
        return qemu is not None and qemu[:2] < (major, minor)

    if mode == "cold":
        return 10.0
    if mode == "warm":
        return 5.0 if before(4, 0) else 7.0
    base = 9.0 if mode == "live" else (5.0 if before(2, 6) else 7.0)
    if postcopy:
        base = min(base, 4.0 if before(3, 0) else 6.0)
    return base


_TECHNIQUE: Mapping[Mode, str] = {
    "live": "pre-copy live migration",
    "online": "NBD export + blockdev-mirror with live migration",
    "cold": "stop, copy, start",
    "warm": "dirty-bitmap rounds then a cold cutover",
}


def _maturity(pred: ModePrediction, assessment: Assessment, record: tuple[int, int] | None
              ) -> Score:
    base = maturity_base(pred.mode, pred.postcopy, assessment.qemu_version)
    technique = "post-copy migration" if pred.postcopy else _TECHNIQUE[pred.mode]
    on = ("" if assessment.qemu_version is None
          else " on QEMU " + ".".join(str(p) for p in assessment.qemu_version))
    reason = f"{technique}{on}: {base:g}"
    value = base
    figure = f"maturity {base:g}"
    if record is not None and record[1] > 0:
        completed, total = record
        if not 0 <= completed <= total:
            raise ValueError(f"track record for {pred.mode}: {completed} of {total} completed")
        value = 0.5 * base + 0.5 * 10 * (completed + 1) / (total + 2)
        reason += f"; vmigrate completed {completed} of {total} ({value:.2f})"
        figure = f"maturity {value:.1f} ({completed} of {total} completed)"
    else:
        reason += "; no vmigrate track record"
    return Score(value=_clip(value), reason=reason, figure=figure)


def _security(mode: Mode, assessment: Assessment) -> Score:
    if mode in ("cold", "warm"):
        return Score(value=10.0, figure="stream AES-256-GCM",
                     reason="the transfer engine encrypts every chunk (AES-256-GCM)")
    if assessment.tls:
        return Score(value=10.0, figure="stream TLS",
                     reason="both hosts hold TLS credentials: QEMU's stream is encrypted")
    return Score(value=PLAINTEXT_SCORE, figure="stream plain text",
                 reason="no TLS credentials on both hosts: plain text on the migration network")


def _rule_out(mode: Mode, pred: ModePrediction | None, tier: Tier | None,
              assessment: Assessment) -> tuple[bool, bool, str | None]:
    """(feasible, allowed, reason it is not a candidate)."""
    if pred is None:
        return False, True, "no prediction for this mode"
    if not pred.feasible or pred.figures is None:
        return False, True, pred.reason or "not feasible (no figures predicted)"
    if tier is not None:
        if mode not in tier.modes:
            return True, False, (f"tier {tier.name} allows only {', '.join(tier.modes)}")
        if tier.require_encryption and mode in ("live", "online") and not assessment.tls:
            return True, False, (f"tier {tier.name} requires encryption and the hosts hold "
                                 "no TLS credentials (the stream would be plain text)")
        if not tier.postcopy and pred.postcopy and mode in ("live", "online"):
            return True, False, (f"tier {tier.name} forbids post-copy and the policy is "
                                 "predicted to need it")
        limit = tier.max_downtime_ms
        if limit is not None and pred.figures.downtime_ms > limit:
            return True, False, (f"predicted downtime {_fmt_ms(pred.figures.downtime_ms)} is "
                                 f"over tier {tier.name}'s limit of {_fmt_ms(limit)}")
    if pred.aborts:
        why = "the convergence policy is predicted to abort"
        dirty = _dirty_phrase(assessment)
        return True, True, f"{why} ({dirty})" if dirty else why
    return True, True, None


def decide(
    vm: str,
    predictions: Mapping[Mode, ModePrediction],
    assessment: Assessment,
    config: PlanningConfig,
    *,
    track: Mapping[Mode, tuple[int, int]] | None = None,
) -> Decision:
    """Score every mode, choose one, and say why.

    ``track`` is vmigrate's own record per mode, ``(completed, total)`` migrations
    (from the store). Modes missing from ``predictions`` are not feasible. Raises
    ValueError only for an impossible track record (completed > total).
    """
    track = track or {}
    tier = tier_for(vm, config)
    weights = (tier.weights if tier is not None and tier.weights is not None
               else config.weights).normalised()

    base: dict[Mode, tuple[bool, bool, str | None]] = {
        mode: _rule_out(mode, predictions.get(mode), tier, assessment) for mode in MODES
    }
    feasible = [m for m in MODES if base[m][0]]

    def figures(mode: Mode) -> tuple[float, int, float]:
        fig = predictions[mode].figures
        assert fig is not None
        return fig.downtime_ms, fig.wire_bytes, fig.total_time_s

    reference = [m for m in feasible if not predictions[m].aborts] or feasible
    least_mode: Mode = "cold"
    least_bytes = 0
    if reference:
        least_mode = min(reference, key=lambda m: figures(m)[1])
        least_bytes = figures(least_mode)[1]

    rows: list[Row] = []
    for mode in MODES:
        is_feasible, allowed, reason = base[mode]
        if not is_feasible:
            rows.append(Row(mode=mode, feasible=False, allowed=allowed, candidate=False,
                            reason=reason))
            continue
        pred = predictions[mode]
        downtime_ms, wire_bytes, total_s = figures(mode)
        scores: dict[Criterion, Score] = {
            "business_continuity": _business_continuity(pred, downtime_ms),
            "bandwidth_cost": _bandwidth(wire_bytes, least_bytes, least_mode),
            "storage_impact": _storage(pred, assessment, total_s, downtime_ms),
            "maturity": _maturity(pred, assessment, track.get(mode)),
            "security": _security(mode, assessment),
        }
        total = sum(weights.get(c) * scores[c].value for c in CRITERIA)
        rows.append(Row(mode=mode, feasible=True, allowed=allowed, candidate=reason is None,
                        reason=reason, postcopy=pred.postcopy, downtime_ms=downtime_ms,
                        wire_bytes=wire_bytes, scores=scores, total=_clip(total)))

    ranked = sorted(
        (r for r in rows if r.candidate),
        key=lambda r: (-round(r.total or 0.0, 9), r.downtime_ms or 0.0, MODES.index(r.mode)),
    )
    chosen = ranked[0] if ranked else None
    runner = ranked[1] if len(ranked) > 1 else None
    explanation = _explain(vm, chosen, runner, rows, tier, weights, predictions, assessment)
    return Decision(
        vm=vm, tier=tier.name if tier else None,
        audit=bool(tier and tier.require_audit), weights=weights, rows=tuple(rows),
        chosen=chosen.mode if chosen else None, runner_up=runner.mode if runner else None,
        explanation=tuple(explanation),
    )


def _tier_sentence(vm: str, tier: Tier | None) -> str:
    if tier is None:
        return f"No tier applies to {vm}: every mode is allowed."
    text = f"Tier {tier.name}"
    if tier.description:
        text += f" ({tier.description})"
    text += f" allows {', '.join(tier.modes)}"
    if tier.max_downtime_ms is not None:
        text += f", with at most {_fmt_ms(tier.max_downtime_ms)} downtime"
    if tier.require_encryption:
        text += ", encrypted streams only"
    if not tier.postcopy:
        text += ", no post-copy"
    text += "."
    if tier.require_audit:
        text += " It requires an audited migration: this one is written to the audit log."
    return text


def _against(mine: str, theirs: str) -> str:
    """``"downtime 45 ms against 9.8 s"``: the label both figures start with said once."""
    a, b = mine.split(), theirs.split()
    start = 0
    while start < min(len(a), len(b)) - 1 and a[start] == b[start]:
        start += 1
    return f"{mine} against {' '.join(b[start:])}"


def _comparison(chosen: Row, runner: Row, weights: Weights) -> list[str]:
    diffs = sorted(
        ((weights.get(c) * (chosen.scores[c].value - runner.scores[c].value), c)
         for c in CRITERIA),
        reverse=True,
    )
    wins = [(d, c) for d, c in diffs if d > 0.05][:2]
    losses = [(d, c) for d, c in diffs if d < -0.05]
    out: list[str] = []
    if wins:
        parts = [f"{LABELS[c]} ({_against(chosen.scores[c].figure, runner.scores[c].figure)}"
                 f" for {runner.mode})" for _, c in wins]
        out.append(f"{chosen.mode} wins on " + " and ".join(parts) + ".")
    if losses:
        _, c = losses[-1]
        out.append(f"It gives up some {LABELS[c]}: "
                   f"{_against(chosen.scores[c].figure, runner.scores[c].figure)} "
                   f"for {runner.mode}.")
    return out


def _explain(vm: str, chosen: Row | None, runner: Row | None, rows: list[Row],
             tier: Tier | None, weights: Weights,
             predictions: Mapping[Mode, ModePrediction], assessment: Assessment) -> list[str]:
    out: list[str] = []
    if chosen is None:
        out.append(f"No mode can be chosen for {vm}: none is both feasible and allowed"
                   " and predicted to finish.")
    else:
        assert chosen.total is not None
        head = f"Chose {_fmt_mode(chosen.mode, chosen.postcopy)} for {vm} " \
               f"(score {chosen.total:.2f} of 10"
        if runner is not None:
            assert runner.total is not None
            head += f"; runner-up {runner.mode} {runner.total:.2f})."
        else:
            head += "; the only mode that can be chosen)."
        out.append(head)
        if runner is not None:
            assert runner.total is not None
            out += _comparison(chosen, runner, weights)
            if round(chosen.total, 9) == round(runner.total, 9):
                out.append("The totals tie; the tie goes to the lower predicted downtime.")
            elif chosen.total - runner.total < CLOSE_CALL:
                out.append(f"A close call: {runner.mode} scores only "
                           f"{chosen.total - runner.total:.2f} less.")
    out.append(_tier_sentence(vm, tier))
    for row in rows:
        if not row.candidate:
            out.append(f"{row.mode} ruled out: {row.reason}.")
    dirty = _dirty_phrase(assessment)
    for row in rows:
        if not row.candidate or not row.feasible:
            continue
        pred = predictions[row.mode]
        assert row.total is not None
        subject = (f"{row.mode} will" if row is chosen
                   else f"{row.mode} (score {row.total:.2f}) would")
        why = f" ({dirty})" if dirty else ""
        if pred.postcopy:
            out.append(f"{subject} need post-copy{why}: a link failure during post-copy "
                       "stops the guest until recovery.")
        elif not pred.converges:
            out.append(f"{subject} not converge by pre-copy alone{why}; the policy's later "
                       "steps finish it.")
    if chosen is not None:
        unc = predictions[chosen.mode].uncertainty
        if unc is None:
            out.append(f"The figures for {chosen.mode} are uncalibrated (no migration history "
                       "to compare with yet): treat them as estimates.")
        else:
            out.append(f"The figures for {chosen.mode} are good to about +-{unc:.0%}, "
                       "by past migrations.")
    return out
