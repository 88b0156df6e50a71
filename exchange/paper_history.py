"""What a paper venue remembers of its settled orders and its trades: a retention window, not the process's life.

A venue keeps the orders it was sent so that a re-sent client order id is answered with that order
(as Binance answers "Duplicate order sent"), and so that `fetch_order` and `fetch_my_trades` can
answer the order manager and the start-up reconciliation. Kept for ever, they grew by about 1 KB an
order for the whole life of the process, and `restore()` rebuilt them whole at every start from
every fill in the ledger: a year of a modest strategy (60 orders a day) is over 20 MB on a daemon
whose whole budget is 200 MB.

Nobody asks a venue about an old settled order: the order manager asks again about one order for a
few minutes at most (`OrderManager.max_resolve_seconds`, resolving a send whose answer was lost), and
the reconciliation asks for trades from an hour before the ledger's newest fill. The ledger keeps
every order and fill for good, and balances and positions are computed from every fill whatever this
keeps. So a settled order is forgotten `RETENTION_SECONDS` after it settled, and a trade that long
after it happened; an order still open (a protective stop resting for weeks) is never forgotten.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from operator import attrgetter, itemgetter
from typing import Generic, Protocol, TypeVar

from core.types import Fill, OrderState

RETENTION_SECONDS = 7 * 86_400.0


class _VenueOrder(Protocol):
    @property
    def state(self) -> OrderState: ...


OrderT = TypeVar("OrderT", bound=_VenueOrder)


class SettledHistory(Generic[OrderT]):
    """A venue's orders by client order id and its trades, oldest first. The venue tells it when an
    order settles (`settled`) and calls `forget_old` as it takes new orders."""

    def __init__(self, retention_seconds: float = RETENTION_SECONDS) -> None:
        if not retention_seconds > 0:
            raise ValueError(f"retention_seconds must be positive, got {retention_seconds}")
        self.retention_seconds = retention_seconds
        self.orders: dict[str, OrderT] = {}
        self.trades: deque[Fill] = deque()
        self._settled: deque[tuple[float, str]] = deque()  # (when, client order id), oldest first

    def settled(self, client_order_id: str, ts: float) -> None:
        """The order reached a final state at `ts` (filled, cancelled, rejected). For the order path,
        where `ts` is the venue's now: notes are kept in the order they come, which `forget_old`
        takes for time order. Settles rebuilt out of time order go to `restore_settled`."""
        self._settled.append((ts, client_order_id))

    def add_trade(self, fill: Fill) -> None:
        self.trades.append(fill)

    def trades_of(self, symbol: str, since: float | None) -> list[Fill]:
        return [f for f in self.trades if f.symbol == symbol and (since is None or f.ts >= since)]

    def forget_old(self, now: float) -> None:
        """Drop settled orders and trades older than the retention window. Costs a comparison when
        there is nothing to drop, so the venue calls it on every new order."""
        cutoff = now - self.retention_seconds
        settled = self._settled
        while settled and settled[0][0] < cutoff:
            _, cid = settled.popleft()
            order = self.orders.get(cid)
            if order is not None and order.state.is_terminal:
                del self.orders[cid]
        trades = self.trades
        while trades and trades[0].ts < cutoff:
            trades.popleft()

    def clear(self) -> None:
        self.orders.clear()
        self.trades.clear()
        self._settled.clear()

    def restore_settled(self, entries: Iterable[tuple[str, float]]) -> None:
        """Orders that settled before a restart, as (client order id, when), in any order: merged with
        the notes already taken, oldest first. `restore()` rebuilds orders by order, not by when they
        settled; appended as they come, a recent note in front would hold every older one behind it
        (and its order) until the recent one's own window ran out, up to the whole window late."""
        merged = sorted([*self._settled, *((ts, cid) for cid, ts in entries)], key=itemgetter(0))
        self._settled.clear()
        self._settled.extend(merged)

    def restore_trades(self, fills: Iterable[Fill]) -> None:
        """Trades from before a restart, in any order: merged with those already kept, oldest first
        (for fills of the same instant, in the order given, so pass them as they happened)."""
        merged = sorted([*self.trades, *fills], key=attrgetter("ts"))
        self.trades.clear()
        self.trades.extend(merged)
