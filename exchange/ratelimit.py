"""A request-weight budget per Binance API, shared by every client that calls it.

Binance limits request weight per IP and per API (spot 6000 per minute, USD-M futures 2400), and the
penalty for going over is a 429 and then an IP ban (418) that stops every engine at once. Each
ccxt instance has its own throttler, which cannot see the other clients and sleeps on the wall clock;
this bucket runs on the project's `Clock` and is handed to every client of the same API (the spot
engine, the futures engine, a data feed), so together they stay well under the limit.

The bucket holds `burst` weight and refills at `rate_per_second`; the most any rolling minute can
spend is `burst + 60 * rate_per_second`, set to three quarters of Binance's limit by default.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from core.clock import Clock
from core.types import MarketType

# Binance's REQUEST_WEIGHT per minute, per IP.
BINANCE_WEIGHT_PER_MINUTE: dict[MarketType, int] = {MarketType.SPOT: 6000, MarketType.FUTURES: 2400}


@dataclass(slots=True)
class BudgetStats:
    spent: int = 0
    waits: int = 0
    waited_seconds: float = 0.0
    drains: int = 0


class WeightBudget:
    """Token bucket of request weight. `acquire(w)` waits (on the clock) until `w` weight is free."""

    def __init__(self, clock: Clock, *, rate_per_second: float, burst: float) -> None:
        if rate_per_second <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._clock = clock
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._tokens = burst
        self._stamp = clock.monotonic()
        self._lock = asyncio.Lock()
        self.stats = BudgetStats()

    @classmethod
    def for_binance(cls, market_type: MarketType, clock: Clock, *, share: float = 0.75) -> WeightBudget:
        """A bucket whose worst rolling minute spends `share` of Binance's limit for that API:
        a third of it as burst, the rest as steady refill."""
        limit = BINANCE_WEIGHT_PER_MINUTE[market_type] * share
        return cls(clock, rate_per_second=limit * 2 / 3 / 60, burst=limit / 3)

    @property
    def available(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_second)

    def try_take(self, weight: float) -> bool:
        """Take `weight` now if it is there and nobody is queued for it; never waits.

        The common case on the order path: a plain call, so a caller with budget to spare pays for
        no coroutine. On False nothing was taken, and the caller awaits `acquire` for its turn.
        """
        if self._lock.locked():
            return False  # others are waiting for the refill: queue behind them, do not overtake
        need = weight if weight <= self.burst else self.burst
        self._refill()
        if self._tokens >= need:
            self._tokens -= need
            self.stats.spent += int(weight)
            return True
        return False

    async def acquire(self, weight: float) -> float:
        """Take `weight` from the bucket, waiting for the refill if needed; returns seconds waited.

        A weight larger than the burst is capped at the burst, so one heavy call still goes through
        (after the bucket is full) instead of waiting forever.
        """
        if self.try_take(weight):
            return 0.0
        need = min(float(weight), self.burst)
        waited = 0.0
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= need:
                    self._tokens -= need
                    self.stats.spent += int(weight)
                    if waited > 0:
                        self.stats.waits += 1
                        self.stats.waited_seconds += waited
                    return waited
                delay = (need - self._tokens) / self.rate_per_second
                start = self._clock.monotonic()
                await self._clock.sleep(delay)
                waited += max(self._clock.monotonic() - start, 0.0)

    def drain(self) -> None:
        """The exchange said "too many requests": spend what is left, so every client sharing this
        budget slows to the refill rate instead of hammering on."""
        self._refill()
        self._tokens = 0.0
        self.stats.drains += 1


class BudgetRegistry:
    """One budget per Binance API for the whole process; give the same registry to every client."""

    def __init__(self, clock: Clock, *, share: float = 0.75) -> None:
        self._clock = clock
        self._share = share
        self._budgets: dict[MarketType, WeightBudget] = {}

    def for_market(self, market_type: MarketType) -> WeightBudget:
        budget = self._budgets.get(market_type)
        if budget is None:
            budget = WeightBudget.for_binance(market_type, self._clock, share=self._share)
            self._budgets[market_type] = budget
        return budget
