"""Trade metrics per engine and per symbol, from closed trades as the ledger records them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.types import Fill, MarketType, PositionSide, Side
from engines.trade_metrics import Metrics, load_report, metrics, report
from storage.ledger import ClosedTrade, Ledger

D = Decimal


def trade(symbol: str, pnl: str) -> ClosedTrade:
    return ClosedTrade("futures", MarketType.FUTURES, symbol, PositionSide.LONG, D(1), D(100), D(100), D(pnl),
                       D(0), 0.0, 1.0)


def test_metrics_of_a_known_series() -> None:
    m = metrics([D(30), D(-10), D(20), D(-20), D(0)])
    assert (m.trades, m.wins, m.losses) == (5, 2, 2)
    assert m.win_rate_pct == D("40.00")
    assert m.profit_factor == D("1.6667")  # 50 / 30
    assert m.average_pnl == D(4) and m.total_pnl == D(20)
    assert m.largest_loss == D(-20)


def test_no_trades_and_no_losses() -> None:
    assert metrics([]) == Metrics()
    m = metrics([D(5), D(7)])
    assert m.profit_factor is None and m.largest_loss == 0 and m.win_rate_pct == D("100.00")
    assert m.as_dict()["profit_factor"] is None


def test_report_splits_by_symbol() -> None:
    r = report([trade("BTC/USDT", "10"), trade("ETH/USDT", "-4"), trade("BTC/USDT", "-2")])
    assert r.overall.trades == 3 and r.overall.total_pnl == D(4)
    assert r.by_symbol["BTC/USDT"].trades == 2 and r.by_symbol["BTC/USDT"].profit_factor == D(5)
    assert r.by_symbol["ETH/USDT"].largest_loss == D(-4)
    assert list(r.as_dict()["by_symbol"]) == ["BTC/USDT", "ETH/USDT"]


pnls = st.lists(st.decimals(min_value=D(-1000), max_value=D(1000), places=4), max_size=60)


@settings(max_examples=200, deadline=None)
@given(values=pnls)
def test_metrics_are_consistent(values: list[Decimal]) -> None:
    m = metrics(values)
    assert m.trades == len(values) == m.wins + m.losses + sum(1 for v in values if v == 0)
    assert m.total_pnl == sum(values, D(0)) == m.gross_profit - m.gross_loss
    assert 0 <= m.win_rate_pct <= 100
    assert m.largest_loss <= 0 and all(v >= m.largest_loss for v in values)
    if m.profit_factor is not None:
        assert m.profit_factor >= 0 and m.losses > 0


async def test_load_report_reads_the_ledgers_closed_trades(tmp_path: Path) -> None:
    clock = SimClock()
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    try:
        def fill(cid: str, side: Side, price: str) -> Fill:
            return Fill(cid, cid, "futures", MarketType.FUTURES, "BTC/USDT", side, D(1), D(price), D("0.1"),
                        "USDT", clock.now())

        await ledger.record_fill(fill("a", Side.BUY, "100"), leverage=5)
        await ledger.record_fill(fill("b", Side.SELL, "110"), leverage=5)  # +10 - 0.2 fees
        await ledger.record_fill(fill("c", Side.SELL, "100"), leverage=5)  # a short
        await ledger.record_fill(fill("d", Side.BUY, "105"), leverage=5)   # -5 - 0.2 fees
        await ledger.record_fill(Fill("e", "e", "spot", MarketType.SPOT, "BTC/USDT", Side.BUY, D(1), D(1), D(0),
                                      "USDT", clock.now()))
        r = await load_report(ledger, "futures")
    finally:
        await ledger.close()
    assert r.overall.trades == 2 and r.overall.wins == 1
    assert r.overall.total_pnl == D("4.6")
    assert r.overall.largest_loss == D("-5.2")


def test_a_profit_factor_over_a_tiny_loss_is_reported_not_raised() -> None:
    """100 over a loss of 3.33E-38 needs 43 digits at 4 places: more than the 40-digit context, which
    used to raise InvalidOperation at every engine start (the metrics are loaded in load_state)."""
    m = metrics([Decimal("100"), Decimal("-3.33E-38")])
    assert (m.trades, m.wins, m.losses) == (2, 1, 1)
    assert m.profit_factor is not None and m.profit_factor > Decimal("1E+39")
