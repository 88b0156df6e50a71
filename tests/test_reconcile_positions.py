"""Start-up reconciliation, futures positions: one the ledger holds but the exchange does not (liquidated
or closed by hand while the daemon was down) is a finding the owner hears about, like the reverse."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from core.clock import LiveClock
from core.events import EventBus
from core.types import Fill, MarketType, Side
from engines.reconcile import reconcile_engine
from exchange.base import Balance, ExchangePosition
from exchange.markets import paper_markets
from exchange.orders import OrderManager
from storage.ledger import Ledger

FSYM = "BTC/USDT:USDT"


class FakeFutures:
    market_type = MarketType.FUTURES
    answers_inline = False

    def __init__(self, positions: list[ExchangePosition]) -> None:
        self.markets = paper_markets([FSYM], MarketType.FUTURES)
        self.positions = positions

    def market(self, symbol: str) -> Any:
        return self.markets[symbol]

    async def fetch_my_trades(self, symbol: str, since: float | None = None) -> list[Fill]:
        # The position was liquidated while the daemon was down: Binance's own order ("autoclose-..."),
        # which reconciliation can only report as an unknown trade.
        return []

    async def fetch_open_orders(self, symbols: list[str]) -> list[Any]:
        return []

    async def fetch_positions(self) -> list[ExchangePosition]:
        return self.positions

    async def fetch_balance(self) -> Balance:
        return Balance()


async def test_a_ledger_position_the_exchange_no_longer_has_is_reported(tmp_path: Path) -> None:
    clock = LiveClock()
    async with await Ledger.open(tmp_path / "l.sqlite3", clock) as ledger:
        now = clock.now() - 3600
        await ledger.record_fill(Fill("kef-1", "t1", "futures", MarketType.FUTURES, FSYM, Side.BUY,
                                      Decimal("0.1"), Decimal("50000"), Decimal("2.5"), "USDT", now), leverage=5)
        assert await ledger.positions("futures")
        ex = FakeFutures(positions=[])  # flat on the exchange
        bus = EventBus()
        orders = OrderManager("futures", ex, ledger, bus, clock)  # type: ignore[arg-type]
        report = await reconcile_engine("futures", ex, orders, ledger, [FSYM], bus, clock)  # type: ignore[arg-type]
        [finding] = report.findings
        assert finding.startswith("position missing on exchange: ") and FSYM in finding
