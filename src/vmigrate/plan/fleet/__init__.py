"""Fleets: waves, host evacuation and rebalancing under shared link budgets (pure).

Plain data in, plain data out; no clock, no I/O.

``vmigrate.plan.fleet.model``
    :class:`Link`, :class:`Host`, :class:`Vm`, :class:`Fleet` and :class:`Move`, checked
    when built (:class:`FleetError`).
``vmigrate.plan.fleet.estimate``
    The :class:`Estimator` seam (one VM's move at a bandwidth) and
    :class:`ModelEstimator`, on the single-migration models.
``vmigrate.plan.fleet.placement``
    Where VMs go: :func:`plan_evacuation` empties a host, :func:`plan_rebalance` evens
    out the active ones; each choice explained.
``vmigrate.plan.fleet.schedule``
    When each move runs and at what bandwidth: :func:`schedule`, the product's
    strategy and the baselines it is compared with, one ETA for the whole wave.
``vmigrate.plan.fleet.check``
    :func:`check_schedule`: every rule a schedule breaks, at any instant.
"""

from vmigrate.plan.fleet.check import check_schedule
from vmigrate.plan.fleet.estimate import Estimate, Estimator, ModelEstimator
from vmigrate.plan.fleet.model import Fleet, FleetError, Host, Link, Move, Vm
from vmigrate.plan.fleet.placement import Placement, imbalance, plan_evacuation, plan_rebalance
from vmigrate.plan.fleet.schedule import (
    MIN_SHARE,
    STRATEGIES,
    Entry,
    Schedule,
    Strategy,
    schedule,
)

__all__ = [
    "MIN_SHARE",
    "STRATEGIES",
    "Entry",
    "Estimate",
    "Estimator",
    "Fleet",
    "FleetError",
    "Host",
    "Link",
    "ModelEstimator",
    "Move",
    "Placement",
    "Schedule",
    "Strategy",
    "Vm",
    "check_schedule",
    "imbalance",
    "plan_evacuation",
    "plan_rebalance",
    "schedule",
]
