"""Planning with the store: calibration history, track record, plans, predictions
kept in migration reports.

The pure models live in :mod:`vmigrate.plan`; this module feeds them what the
store knows (finished migrations with the prediction they started from, stored
assessments) and shapes their output for the CLI and the reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vmigrate.config import Inventory
from vmigrate.errors import StoreError, UserError
from vmigrate.migration.report import load_report
from vmigrate.plan.assessment import Assessment, Figures, Mode, ModePrediction
from vmigrate.plan.capabilities import MigrationOptions
from vmigrate.plan.decide import Decision, PlanningConfig, decide, load_planning, tier_for
from vmigrate.plan.predict import (
    Calibration,
    HistoryEntry,
    calibrate,
    measured_figures,
    predict,
)
from vmigrate.progress import Event, ProgressFn
from vmigrate.service.assess import AssessOptions, Assessor
from vmigrate.store import Store

#: the prediction a report carries is comparable with this model's (calibration
#: ignores older ones)
MODEL_VERSION = 1
#: a stored assessment younger than this is reused by plan and migrate (seconds)
DEFAULT_MAX_AGE_S = 600.0


def history(store: Store) -> list[HistoryEntry]:
    """Finished migrations whose report holds a raw prediction of this model."""
    entries: list[HistoryEntry] = []
    for job in store.list_jobs(active=False):
        if not job.report:
            continue
        try:
            report = load_report({**job.report, "status": job.status}).model_dump(mode="json")
        except StoreError:  # a report this vmigrate cannot read teaches nothing
            continue
        pred = report.get("prediction")
        if not pred or pred.get("model") != MODEL_VERSION or not pred.get("raw"):
            continue
        measured = measured_figures(report)
        if measured is None:
            continue
        entries.append(HistoryEntry.model_validate(
            {"mode": job.mode, "vm": job.vm, "at": job.created_at,
             "raw": Figures.model_validate(pred["raw"]), "measured": measured}))
    return entries


def track_record(store: Store) -> dict[Mode, tuple[int, int]]:
    """Per mode: (completed, finished) migrations vmigrate ran."""
    out: dict[str, list[int]] = {}
    for job in store.list_jobs(active=False):
        n = out.setdefault(job.mode, [0, 0])
        n[1] += 1
        if job.status == "completed":
            n[0] += 1
    return {m: (c, t) for m, (c, t) in out.items()  # type: ignore[misc]
            if m in ("live", "online", "cold", "warm")}


def planning_config(inv: Inventory) -> PlanningConfig:
    return load_planning(inv.planning, inv.tiers)


@dataclass(frozen=True)
class VmPlan:
    """One VM's assessment, every mode's prediction, and the decision."""

    assessment: Assessment
    predictions: dict[Mode, ModePrediction]
    decision: Decision
    calibration: Calibration

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.assessment.vm,
            "source": self.assessment.host,
            "dest": self.assessment.link.dest if self.assessment.link else None,
            "assessed_at": self.assessment.at,
            "predictions": {m: p.model_dump(mode="json") for m, p in self.predictions.items()},
            "decision": self.decision.model_dump(mode="json"),
        }


def make_plan(inv: Inventory, store: Store, a: Assessment, opts: MigrationOptions, *,
              shutdown_timeout: float = 60.0, config: PlanningConfig | None = None) -> VmPlan:
    """Predict every mode for an assessment (calibrated on the store's history)
    and decide. Reads the store only."""
    cal = calibrate(history(store), vm=a.vm)
    config = config or planning_config(inv)
    tier = tier_for(a.vm, config)
    preds = predict(a, policy=opts.policy, downtime_ms=opts.downtime_ms,
                    bandwidth=opts.bandwidth, shutdown_timeout=shutdown_timeout,
                    calibration=cal, postcopy_allowed=tier is None or tier.postcopy,
                    max_downtime_ms=None if tier is None else tier.max_downtime_ms)
    decision = decide(a.vm, preds, a, config, track=track_record(store))
    return VmPlan(a, preds, decision, cal)


def latest_assessment(store: Store, vm: str, dest: str, *, max_age: float,
                      now: float | None = None) -> Assessment | None:
    """The newest stored assessment of ``vm`` with a link to ``dest``, if younger
    than ``max_age`` seconds."""
    now = time.time() if now is None else now
    for raw in reversed(store.list_assessments(vm, dest=dest, since=now - max_age)):
        a = Assessment.model_validate(raw)
        if a.link is not None:
            return a
    return None


def prediction_record(plan: VmPlan, mode: Mode, *, chosen_by: str) -> dict[str, Any]:
    """What a migration report keeps of the plan it started from."""
    p = plan.predictions[mode]
    if not p.feasible or p.figures is None or p.raw is None:
        raise UserError(f"mode {mode} is not possible for {plan.assessment.vm}: {p.reason}")
    return {
        "model": MODEL_VERSION,
        "mode": mode,
        "chosen_by": chosen_by,
        "assessed_at": plan.assessment.at,
        "figures": p.figures.model_dump(mode="json"),
        "raw": p.raw.model_dump(mode="json"),
        "postcopy": p.postcopy,
        "uncertainty": p.uncertainty,
        "dirty_rate": plan.assessment.dirty_rate,
        "link_bandwidth": plan.assessment.link.bandwidth if plan.assessment.link else None,
        "explanation": list(plan.decision.explanation) if chosen_by == "auto" else [],
    }


async def plans_for(inv: Inventory, store: Store, names: list[str], to: str,
                    opts: MigrationOptions, max_age: float, aopts: AssessOptions,
                    shutdown_timeout: float, *,
                    progress: ProgressFn | None = None) -> list[VmPlan]:
    """A plan for each VM towards ``to``: from its stored assessment of the route if one
    is younger than ``max_age`` seconds, else from a new assessment (stored)."""
    say = progress or (lambda _e: None)
    config = planning_config(inv)  # a bad [planning] fails before any measuring
    plans = []
    async with Assessor(inv, store, progress=progress) as assessor:
        for name in names:
            a = latest_assessment(store, name, to, max_age=max_age)
            if a is None:
                say(Event(message=f"{name}: assessing (no assessment of the route younger "
                                  f"than {max_age:g} s)"))
                a = await assessor.assess(name, dest=to, opts=aopts)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.at))
                say(Event(message=f"{name}: using the assessment of {when}"))
            plans.append(make_plan(inv, store, a, opts, shutdown_timeout=shutdown_timeout,
                                   config=config))
    return plans
