"""Capital allocation: validation, effective shares, budgets and reservations that never overspend."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from core.errors import ConfigError
from risk.allocator import CapitalAllocator, Reservation

D = Decimal
ENGINES = ("spot", "futures", "grid")

pcts = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)
equities = st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False, allow_infinity=False)
notionals = st.decimals(min_value=0, max_value=10**6, places=4, allow_nan=False, allow_infinity=False)


def _valid_allocations() -> st.SearchStrategy[dict[str, float]]:
    """Percentages per engine that sum to at most 100 (checked exactly, as the allocator does)."""
    return st.dictionaries(st.sampled_from(ENGINES), pcts, min_size=1, max_size=3).filter(
        lambda a: sum(D(str(p)) for p in a.values()) <= 100
    )


# --- validation ----------------------------------------------------------------------------------
@given(a=pcts, b=pcts)
@settings(max_examples=150, deadline=None)
def test_sum_above_100_is_rejected_and_at_most_100_accepted(a: float, b: float) -> None:
    total = D(str(a)) + D(str(b))
    if total > 100:
        with pytest.raises(ConfigError) as err:
            CapitalAllocator({"spot": a, "futures": b}, enabled={"spot"})
        assert len(err.value.problems) == 1
        assert "at most 100" in err.value.problems[0]
    else:
        alloc = CapitalAllocator({"spot": a, "futures": b}, enabled={"spot", "futures"})
        assert alloc.share_pct("spot") == D(str(a))
        assert alloc.share_pct("futures") == D(str(b))


def test_sum_of_exactly_100_is_accepted_despite_float_representation() -> None:
    # 33.3 + 33.3 + 33.4 is 100.00000000000001 in floats; the user wrote 100.
    alloc = CapitalAllocator({"spot": 33.3, "futures": 33.3, "grid": 33.4}, enabled=ENGINES)
    assert sum(alloc.share_pct(e) for e in ENGINES) == 100


@pytest.mark.parametrize("bad", [-0.01, 100.01, float("nan"), float("inf"), -float("inf")])
def test_percentage_outside_0_to_100_is_rejected(bad: float) -> None:
    with pytest.raises(ConfigError) as err:
        CapitalAllocator({"spot": 50.0, "futures": bad}, enabled={"spot"})
    assert err.value.problems == [f"FUTURES_ALLOCATION_PCT: {bad!r} must be between 0 and 100"]


def test_every_problem_is_reported_one_line_each() -> None:
    with pytest.raises(ConfigError) as err:
        CapitalAllocator({"spot": -1.0, "futures": 101.0}, enabled={"spot", "grid"})
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("SPOT_ALLOCATION_PCT")
    assert problems[1].startswith("FUTURES_ALLOCATION_PCT")
    assert "grid" in problems[2] and "no allocation" in problems[2]
    assert str(err.value).count("\n") == 2


# --- shares and budgets --------------------------------------------------------------------------
@given(alloc=_valid_allocations(), enabled=st.sets(st.sampled_from(ENGINES)), equity=equities)
@settings(max_examples=200, deadline=None)
def test_budgets_never_sum_to_more_than_equity(
    alloc: dict[str, float], enabled: set[str], equity: Decimal
) -> None:
    enabled &= set(alloc)
    a = CapitalAllocator(alloc, enabled)
    budgets = [a.budget(e, equity) for e in alloc]
    assert all(b >= 0 for b in budgets)
    assert sum(budgets) <= equity
    configured = sum(D(str(p)) for p in alloc.values())
    shares = sum(a.share_pct(e) for e in alloc)
    assert shares <= configured
    if enabled:
        # Everything configured is handed out to the enabled engines (up to rounding down), no more.
        assert configured - shares < D("1e-20")
    else:
        assert shares == 0


@given(alloc=_valid_allocations(), disabled=st.sampled_from(ENGINES))
@settings(max_examples=200, deadline=None)
def test_disabled_share_goes_to_enabled_engines_in_proportion(
    alloc: dict[str, float], disabled: str
) -> None:
    enabled = {e for e in alloc if e != disabled}
    a = CapitalAllocator(alloc, enabled)
    assert a.share_pct(disabled) == 0
    configured = {e: D(str(p)) for e, p in alloc.items()}
    own_total = sum(configured[e] for e in enabled)
    freed = configured.get(disabled, D(0))
    for e in enabled:
        if own_total > 0:
            expected = configured[e] + freed * configured[e] / own_total
        else:
            expected = configured[e] + freed / len(enabled)
        assert abs(a.share_pct(e) - expected) < D("1e-20")
        assert a.share_pct(e) >= configured[e]


def test_disabled_futures_gives_its_share_to_spot_and_unallocated_stays_unallocated() -> None:
    assert CapitalAllocator({"spot": 60, "futures": 40}, {"spot"}).share_pct("spot") == 100
    a = CapitalAllocator({"spot": 50, "futures": 30}, {"spot"})
    assert a.share_pct("spot") == 80
    assert a.share_pct("futures") == 0
    assert a.budget("spot", D("10000")) == D("8000")
    assert a.budget("futures", D("10000")) == 0


def test_enabled_engines_with_zero_pct_split_a_disabled_share_equally() -> None:
    a = CapitalAllocator({"spot": 0, "futures": 0, "grid": 40}, {"spot", "futures"})
    assert a.share_pct("spot") == 20
    assert a.share_pct("futures") == 20
    assert a.share_pct("grid") == 0


def test_proportional_reallocation_example() -> None:
    a = CapitalAllocator({"spot": 30, "futures": 10, "grid": 20}, {"spot", "futures"})
    assert a.share_pct("spot") == 45  # 30 + 20 * 30/40
    assert a.share_pct("futures") == 15  # 10 + 20 * 10/40


def test_budget_is_zero_for_unknown_engine_and_non_positive_equity() -> None:
    a = CapitalAllocator({"spot": 60, "futures": 40}, {"spot", "futures"})
    assert a.budget("grid", D(1000)) == 0
    assert a.budget("spot", D(-5)) == 0
    assert a.budget("spot", D("NaN")) == 0
    assert a.budget("spot", D("1234.56")) == D("740.736")


# --- reservations --------------------------------------------------------------------------------
def test_two_intents_that_fit_alone_cannot_both_reserve() -> None:
    a = CapitalAllocator({"spot": 60, "futures": 40}, {"spot", "futures"})
    equity = D(10_000)
    first = a.reserve("spot", D(4000), equity)
    assert first is not None
    assert a.reserve("spot", D(4000), equity) is None
    assert a.reserved("spot") == D(4000)
    assert a.available("spot", equity) == D(2000)
    # The other engine's budget is its own.
    assert a.reserve("futures", D(4000), equity) is not None
    a.release(first)
    assert a.reserve("spot", D(4000), equity) is not None


def test_exposure_counts_against_the_budget() -> None:
    a = CapitalAllocator({"spot": 50}, {"spot"})
    equity = D(1000)
    a.set_exposure("spot", D(450))
    assert a.reserve("spot", D("50.01"), equity) is None
    r = a.reserve("spot", D(50), equity)
    assert r is not None
    assert (r.engine, r.notional) == ("spot", D(50))
    assert a.available("spot", equity) == 0
    a.set_exposure("spot", D(600))  # prices moved: over budget shows as nothing available
    assert a.available("spot", equity) == 0


def test_release_is_idempotent() -> None:
    a = CapitalAllocator({"spot": 50}, {"spot"})
    r1 = a.reserve("spot", D(100), D(1000))
    r2 = a.reserve("spot", D(200), D(1000))
    assert r1 is not None and r2 is not None and r1.id != r2.id
    a.release(r1)
    a.release(r1)
    assert a.reserved("spot") == D(200)
    assert a.open_reservations("spot") == 1
    a.release(r2)
    assert a.reserved("spot") == 0


@pytest.mark.parametrize("notional", [D(0), D(-1), D("NaN"), D("Infinity")])
def test_non_positive_or_non_finite_notional_is_not_reserved(notional: Decimal) -> None:
    a = CapitalAllocator({"spot": 50}, {"spot"})
    assert a.reserve("spot", notional, D(1000)) is None
    assert a.reserved("spot") == 0


def test_negative_exposure_is_a_bug() -> None:
    a = CapitalAllocator({"spot": 50}, {"spot"})
    with pytest.raises(ValueError):
        a.set_exposure("spot", D(-1))


class ReservationMachine(RuleBasedStateMachine):
    """Any interleaving of reserve / release / set_exposure: the allocator agrees with a simple model
    and never grants a reservation that takes an engine past its budget."""

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = CapitalAllocator({"spot": 60, "futures": 30}, {"spot", "futures"})
        self.live: dict[int, Reservation] = {}
        self.exposure = {"spot": D(0), "futures": D(0)}

    def model_reserved(self, engine: str) -> Decimal:
        return sum((r.notional for r in self.live.values() if r.engine == engine), D(0))

    @rule(target=reservations, engine=st.sampled_from(["spot", "futures"]), notional=notionals,
          equity=equities)
    def reserve(self, engine: str, notional: Decimal, equity: Decimal) -> Reservation | None:
        budget = self.alloc.budget(engine, equity)
        fits = notional > 0 and self.exposure[engine] + self.model_reserved(engine) + notional <= budget
        r = self.alloc.reserve(engine, notional, equity)
        assert (r is not None) == fits
        if r is not None:
            self.live[r.id] = r
            assert self.alloc.reserved(engine) + self.exposure[engine] <= budget
        return r

    @rule(r=reservations)
    def release_twice_possible(self, r: Reservation | None) -> None:
        # Drawn without consuming, so the same reservation may be released again later.
        if r is not None:
            self.alloc.release(r)
            self.live.pop(r.id, None)

    @rule(r=consumes(reservations))
    def release(self, r: Reservation | None) -> None:
        if r is not None:
            self.alloc.release(r)
            self.live.pop(r.id, None)

    @rule(engine=st.sampled_from(["spot", "futures"]), notional=notionals)
    def set_exposure(self, engine: str, notional: Decimal) -> None:
        self.alloc.set_exposure(engine, notional)
        self.exposure[engine] = notional

    @invariant()
    def reserved_matches_live_reservations(self) -> None:
        for engine in ("spot", "futures"):
            assert self.alloc.reserved(engine) == self.model_reserved(engine)
            assert self.alloc.reserved(engine) >= 0


TestReservations = ReservationMachine.TestCase
TestReservations.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
