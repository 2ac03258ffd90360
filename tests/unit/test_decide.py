"""The decision matrix on plain data: settings, scores computed by hand, choices, explanations."""

from __future__ import annotations

import math
from typing import Any

import pytest

from vmigrate.config import parse_inventory
from vmigrate.errors import ConfigError
from vmigrate.plan.assessment import (
    MODES,
    Assessment,
    DirtyWindow,
    DiskAssessment,
    Figures,
    LinkAssessment,
    Mode,
    ModePrediction,
)
from vmigrate.plan.decide import (
    BUILTIN_TIERS,
    CRITERIA,
    POSTCOPY_PENALTY,
    Decision,
    PlanningConfig,
    Tier,
    Weights,
    decide,
    load_planning,
    maturity_base,
    tier_for,
)

MiB = 1 << 20
GiB = 1 << 30
LINK = 100 * MiB


def assessment(dirty: float = 1 * MiB, *, tls: bool = True, shared: bool = True,
               write_rate: float = 0.0, **kw: Any) -> Assessment:
    data: dict[str, Any] = {
        "vm": "web-1", "host": "h1", "at": 0.0, "memory_bytes": GiB,
        "qemu_version": (7, 2, 0),
        "dirty": (DirtyWindow(seconds=1.0, rate=dirty),),
        "disks": (DiskAssessment(device="vda", path="/img/web-1.qcow2", format="qcow2",
                                 virtual_bytes=4 * GiB, allocated_bytes=512 * MiB,
                                 write_rate=write_rate, shared=shared),),
        "link": LinkAssessment(source="h1", dest="h2", bandwidth=LINK),
        "tls": tls,
    }
    data.update(kw)
    return Assessment(**data)


def pred(mode: Mode, total_s: float, downtime_ms: float, wire: int, **kw: Any) -> ModePrediction:
    return ModePrediction(mode=mode, figures=Figures(total_time_s=total_s,
                                                     downtime_ms=downtime_ms, wire_bytes=wire),
                          **kw)


def infeasible(mode: Mode, reason: str) -> ModePrediction:
    return ModePrediction(mode=mode, feasible=False, reason=reason)


def idle_predictions() -> dict[Mode, ModePrediction]:
    """Idle guest, shared storage, 1 GiB RAM, 512 MiB of disk data, 100 MiB/s link."""
    return {
        "live": pred("live", 11.0, 100.0, GiB),
        "online": infeasible("online", "the disks are on shared storage"),
        "cold": pred("cold", 15.0, 15_000.0, 512 * MiB),
        "warm": pred("warm", 20.0, 8_000.0, 600 * MiB),
    }


def busy_predictions(live: ModePrediction | None = None) -> dict[Mode, ModePrediction]:
    """The same guest dirtying 500 MiB/s, 5x the link: live needs post-copy."""
    preds = idle_predictions()
    preds["live"] = live or pred("live", 60.0, 300.0, 5 * GiB, postcopy=True, converges=False)
    preds["warm"] = pred("warm", 20.0, 12_000.0, 700 * MiB)
    return preds


def bc(downtime_ms: float) -> float:
    """Business continuity by the documented formula."""
    return min(10.0, max(0.0, 10 - 2.5 * math.log10(downtime_ms / 100)))


def text(decision: Decision) -> str:
    return "\n".join(decision.explanation)


def total(scores: dict[str, float], weights: dict[str, float] | None = None) -> float:
    w = weights or {"business_continuity": 0.30, "bandwidth_cost": 0.25, "storage_impact": 0.20,
                    "maturity": 0.15, "security": 0.10}
    return sum(w[c] * scores[c] for c in CRITERIA) / sum(w.values())


# -- the two acceptance scenarios ------------------------------------------------------------


def test_idle_guest_chooses_live_with_scores_by_hand() -> None:
    d = decide("web-1", idle_predictions(), assessment(), PlanningConfig())
    assert d.chosen == "live"
    assert d.runner_up == "cold"
    live, cold, warm = d.row("live"), d.row("cold"), d.row("warm")
    assert {c: s.value for c, s in live.scores.items()} == pytest.approx({
        "business_continuity": 10.0,       # 100 ms
        "bandwidth_cost": 7.5,             # 1 GiB = 2x the least (cold, 512 MiB)
        "storage_impact": 10.0,            # shared storage, no copy
        "maturity": 9.0,                   # pre-copy on 7.2, no track record
        "security": 10.0,                  # TLS
    })
    assert live.total == pytest.approx(9.225)
    cold_scores = {"business_continuity": bc(15_000), "bandwidth_cost": 10.0,
                   "storage_impact": 10.0, "maturity": 10.0, "security": 10.0}
    assert {c: s.value for c, s in cold.scores.items()} == pytest.approx(cold_scores)
    assert cold.total == pytest.approx(total(cold_scores))
    # warm: 600 MiB against 512 MiB; copies 12 s (20 s - 8 s of downtime) while running
    assert warm.scores["bandwidth_cost"].value == pytest.approx(10 - 2.5 * math.log2(600 / 512))
    assert warm.scores["storage_impact"].value == pytest.approx(10 / (1 + 12 / 60))
    assert warm.scores["maturity"].value == 7.0
    online = d.row("online")
    assert not online.feasible and not online.candidate and online.total is None
    explained = text(d)
    assert "100 ms" in explained and "15 s" in explained
    assert "the disks are on shared storage" in explained
    assert "uncalibrated" in explained


def test_guest_dirtying_five_times_the_link_avoids_live_and_says_why() -> None:
    busy = assessment(dirty=500 * MiB)
    d = decide("web-1", busy_predictions(), busy, PlanningConfig())
    assert d.chosen is not None and d.chosen != "live"
    live = d.row("live")
    assert live.candidate and live.postcopy
    assert live.scores["business_continuity"].value == pytest.approx(bc(300) - POSTCOPY_PENALTY)
    assert live.scores["maturity"].value == 6.0
    # 5 GiB against cold's 512 MiB: 10x -> 10 - 2.5 log2(10)
    assert live.scores["bandwidth_cost"].value == pytest.approx(10 - 2.5 * math.log2(10))
    explained = text(d)
    assert "post-copy" in explained
    assert "500 MiB/s" in explained and "5x" in explained
    # the idle guest and the busy guest get different modes
    idle = decide("web-1", idle_predictions(), assessment(), PlanningConfig())
    assert idle.chosen != d.chosen


def test_live_predicted_to_abort_is_ruled_out_with_the_dirty_rate() -> None:
    busy = assessment(dirty=500 * MiB)
    aborting = pred("live", 600.0, 300.0, 6 * GiB, converges=False, aborts=True)
    d = decide("web-1", busy_predictions(aborting), busy, PlanningConfig())
    live = d.row("live")
    assert live.feasible and live.allowed and not live.candidate
    assert live.scores["business_continuity"].value == 0.0
    assert d.chosen in ("cold", "warm")
    assert live.reason is not None and "abort" in live.reason and "500 MiB/s" in live.reason
    # aborting live is not the cheapest reference: cold's 512 MiB is
    assert d.row("cold").scores["bandwidth_cost"].value == 10.0


def test_infeasible_reason_is_quoted_verbatim() -> None:
    reason = "dirty rate 500 MiB/s is above the 100 MiB/s link: post-copy needed"
    d = decide("web-1", busy_predictions(infeasible("live", reason)),
               assessment(dirty=500 * MiB), PlanningConfig())
    assert d.chosen != "live"
    assert d.row("live").reason == reason
    assert reason in text(d)


def test_explanation_names_the_runner_up_and_the_deciding_figures() -> None:
    d = decide("web-1", busy_predictions(), assessment(dirty=500 * MiB), PlanningConfig())
    explained = text(d)
    assert d.runner_up is not None
    assert f"runner-up {d.runner_up}" in explained
    first = d.explanation[0]
    assert d.chosen is not None and d.chosen in first
    assert f"{d.row(d.chosen).total:.2f}" in first


# -- tiers ------------------------------------------------------------------------------------


def test_tier_restricts_modes_and_records_audit() -> None:
    config = load_planning({}, {"L1": {"vms": ["db-*"]}})
    preds = idle_predictions()
    d = decide("db-1", preds, assessment(vm="db-1"), config)
    assert d.tier == "L1" and d.audit
    assert d.chosen == "cold"          # live would win on score, but L1 allows cold, warm
    live = d.row("live")
    assert live.feasible and not live.allowed and not live.candidate
    assert live.total is not None      # still scored, for the record
    assert live.reason is not None and "L1" in live.reason
    assert "audit" in text(d)
    other = decide("web-1", preds, assessment(), config)
    assert other.tier is None and other.chosen == "live" and not other.audit


def test_max_downtime_rules_out_slow_modes() -> None:
    config = load_planning({}, {"L1": {"vms": ["db-*"], "max_downtime_ms": 10_000}})
    d = decide("db-1", idle_predictions(), assessment(vm="db-1"), config)
    assert d.chosen == "warm"          # cold's 15 s is over the 10 s limit
    cold = d.row("cold")
    assert not cold.allowed and cold.reason is not None
    assert "15 s" in cold.reason and "10 s" in cold.reason


def test_require_encryption_rules_out_plain_text_live() -> None:
    plain = assessment(tls=False)
    config = load_planning({}, {"L3": {"vms": ["*"], "require_encryption": True}})
    d = decide("web-1", idle_predictions(), plain, config)
    assert d.tier == "L3"
    assert d.chosen is None            # L3 allows live/online only; neither can run encrypted
    assert "TLS" in (d.row("live").reason or "")
    assert d.row("live").scores["security"].value == 2.0


def test_no_feasible_mode_chooses_nothing_and_says_why() -> None:
    preds: dict[Mode, ModePrediction] = {
        "live": infeasible("live", "the guest is not running"),
        "online": infeasible("online", "the guest is not running"),
        "cold": infeasible("cold", "no room on the destination pool"),
    }
    d = decide("web-1", preds, assessment(), PlanningConfig())
    assert d.chosen is None and d.runner_up is None
    assert all(not r.candidate for r in d.rows)
    explained = text(d)
    assert "No mode" in explained
    assert "no room on the destination pool" in explained
    assert d.row("warm").reason == "no prediction for this mode"


def test_changed_weights_flip_the_decision() -> None:
    default = decide("web-1", idle_predictions(), assessment(), PlanningConfig())
    assert default.chosen == "live"
    thrifty = load_planning({"weights": {"business_continuity": 0, "bandwidth_cost": 1,
                                         "storage_impact": 0, "maturity": 0, "security": 0}}, {})
    d = decide("web-1", idle_predictions(), assessment(), thrifty)
    assert d.chosen == "cold"
    assert d.weights.bandwidth_cost == 1.0
    assert d.row("live").total == pytest.approx(7.5)


def test_tier_weights_override_planning_weights() -> None:
    config = load_planning({}, {"cheap": {"vms": ["batch-*"],
                                          "weights": {"business_continuity": 0}}})
    tier = config.tier("cheap")
    assert tier.weights is not None
    assert tier.weights.bandwidth_cost == 0.25   # not given: the planning weight
    d = decide("batch-1", idle_predictions(), assessment(vm="batch-1"), config)
    assert d.weights.business_continuity == 0.0
    assert d.weights.total() == pytest.approx(1.0)
    assert d.chosen == "cold"


def test_zero_bytes_and_zero_downtime_everywhere() -> None:
    preds: dict[Mode, ModePrediction] = {m: pred(m, 0.0, 0.0, 0) for m in MODES}
    d = decide("web-1", preds, assessment(dirty=0.0, tls=True), PlanningConfig())
    for row in d.rows:
        assert row.scores["business_continuity"].value == 10.0
        assert row.scores["bandwidth_cost"].value == 10.0
        assert row.scores["storage_impact"].value == 10.0
    # then maturity decides: cold 10
    assert d.chosen == "cold"


def test_tie_goes_to_the_lower_downtime() -> None:
    only_bc = PlanningConfig(weights=Weights(business_continuity=1, bandwidth_cost=0,
                                             storage_impact=0, maturity=0, security=0))
    preds = idle_predictions()
    preds["live"] = pred("live", 11.0, 80.0, GiB)
    preds["online"] = pred("online", 30.0, 50.0, 2 * GiB)
    d = decide("web-1", preds, assessment(), only_bc)
    assert d.row("live").total == d.row("online").total == 10.0
    assert d.chosen == "online" and d.runner_up == "live"
    assert "totals tie" in text(d)


def test_track_record_blends_into_maturity_and_can_flip() -> None:
    plain = assessment(tls=False)
    d = decide("web-1", idle_predictions(), plain, PlanningConfig())
    assert d.chosen == "live"          # 8.525 against cold's 8.37: close
    assert "close call" in text(d).lower()
    bad = decide("web-1", idle_predictions(), plain, PlanningConfig(),
                 track={"live": (0, 5), "cold": (10, 10)})
    assert bad.row("live").scores["maturity"].value == pytest.approx(0.5 * 9 + 0.5 * 10 / 7)
    assert bad.row("cold").scores["maturity"].value == pytest.approx(5 + 5 * 11 / 12)
    assert bad.chosen == "cold"
    assert "0 of 5" in bad.row("live").scores["maturity"].reason
    # no history (total 0): base only
    fresh = decide("web-1", idle_predictions(), plain, PlanningConfig(), track={"live": (0, 0)})
    assert fresh.row("live").scores["maturity"].value == 9.0


def test_impossible_track_record_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        decide("web-1", idle_predictions(), assessment(), PlanningConfig(),
               track={"live": (3, 2)})


def test_online_storage_score_counts_mirror_writes() -> None:
    preds = idle_predictions()
    preds["online"] = pred("online", 70.0, 1_000.0, 2 * GiB)
    a = assessment(shared=False, write_rate=50 * MiB)
    d = decide("web-1", preds, a, PlanningConfig())
    # 69 s of mirroring while the guest runs, writes at 50 % of the link
    assert d.row("online").scores["storage_impact"].value == pytest.approx(
        10 / (1 + 69 / 60) / 1.5)
    assert "50%" in d.row("online").scores["storage_impact"].reason


def test_maturity_base_by_qemu_version() -> None:
    assert maturity_base("live", False, (7, 2, 0)) == 9.0
    assert maturity_base("live", True, (7, 2, 0)) == 6.0
    assert maturity_base("live", True, (2, 12, 0)) == 4.0   # no post-copy recovery before 3.0
    assert maturity_base("online", False, (2, 5, 0)) == 5.0
    assert maturity_base("online", True, None) == 6.0
    assert maturity_base("warm", False, (3, 1, 0)) == 5.0
    assert maturity_base("warm", False, None) == 7.0
    assert maturity_base("cold", True, (1, 0, 0)) == 10.0


def test_decision_round_trips_through_json() -> None:
    d = decide("web-1", busy_predictions(), assessment(dirty=500 * MiB), PlanningConfig(),
               track={"live": (2, 3)})
    assert Decision.model_validate_json(d.model_dump_json()) == d


def test_calibrated_uncertainty_is_stated() -> None:
    preds = idle_predictions()
    preds["live"] = pred("live", 11.0, 100.0, GiB, uncertainty=0.3)
    d = decide("web-1", preds, assessment(), PlanningConfig())
    assert "30%" in text(d) and "uncalibrated" not in text(d)


# -- settings ---------------------------------------------------------------------------------


def test_defaults_are_the_builtin_tiers_matching_nothing() -> None:
    config = load_planning({}, {})
    assert [t.name for t in config.tiers] == ["L1", "L2", "L3"]
    assert config.weights == Weights()
    assert tier_for("anything", config) is None
    assert BUILTIN_TIERS["L1"].modes == ("cold", "warm") and BUILTIN_TIERS["L1"].require_audit
    assert BUILTIN_TIERS["L2"].modes == ("online",)
    assert BUILTIN_TIERS["L3"].modes == ("live", "online")


def test_weights_are_normalised_and_percentages_work() -> None:
    w = Weights(business_continuity=30, bandwidth_cost=25, storage_impact=20, maturity=15,
                security=10).normalised()
    assert w.total() == pytest.approx(1.0)
    assert w.business_continuity == pytest.approx(0.30)
    assert Weights().normalised().security == pytest.approx(0.10)


def test_tier_tables_extend_builtins_and_add_new_ones_in_order() -> None:
    config = load_planning({"default_tier": "L3"}, {
        "L1": {"vms": ["db-*"]},
        "edge": {"vms": ["db-edge-*", "cache-*"], "modes": ["warm", "cold", "warm"]},
    })
    assert [t.name for t in config.tiers] == ["L1", "L2", "L3", "edge"]
    l1 = config.tier("L1")
    assert l1.modes == ("cold", "warm") and l1.require_audit and l1.vms == ("db-*",)
    edge = config.tier("edge")
    assert edge.modes == ("warm", "cold")          # duplicates dropped
    assert tier_for("db-edge-1", config) is l1     # built-ins match first
    assert tier_for("cache-1", config) is edge
    assert tier_for("web-1", config) is config.tier("L3")   # the default
    assert tier_for("DB-1", config) is config.tier("L3")    # globs are case-sensitive


def test_planning_from_the_inventory_file() -> None:
    inv = parse_inventory("""
[planning]
default_tier = "L2"
[planning.weights]
business_continuity = 50
bandwidth_cost = 20
storage_impact = 10
maturity = 10
security = 10

[tiers.L1]
vms = ["db-*"]
max_downtime_ms = 20000
""")
    config = load_planning(inv.planning, inv.tiers)
    assert config.weights.normalised().business_continuity == pytest.approx(0.5)
    assert config.tier("L1").max_downtime_ms == 20_000
    assert config.default_tier == "L2"


@pytest.mark.parametrize(("planning", "tiers", "field"), [
    ({"weights": {"security": -1}}, {}, "weights.security"),
    ({"weights": {c: 0 for c in CRITERIA}}, {}, "weights"),
    ({"weights": {"speed": 1}}, {}, "weights.speed"),
    ({"colour": "blue"}, {}, "colour"),
    ({"default_tier": "L9"}, {}, "default_tier"),
    ({}, {"L1": {"modes": ["teleport"]}}, "modes"),
    ({}, {"L1": {"modes": []}}, "modes"),
    ({}, {"L2": {"vms": [""]}}, "vms"),
    ({}, {"L2": {"max_downtime_ms": -5}}, "max_downtime_ms"),
    ({}, {"L3": {"priority": 1}}, "priority"),
    ({}, {"new": {"weights": {"maturity": -0.1}}}, "weights.maturity"),
    ({}, {"new": {"name": "other"}}, "name"),
])
def test_invalid_planning_names_the_field(planning: dict[str, Any], tiers: dict[str, Any],
                                          field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_planning(planning, tiers)
    assert field in str(err.value)


def test_tier_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError):
        load_planning({}, {"L1": "db-*"})  # type: ignore[dict-item]


def test_tier_model_defaults() -> None:
    tier = Tier(name="t")
    assert tier.modes == MODES and not tier.matches("x") and tier.weights is None
