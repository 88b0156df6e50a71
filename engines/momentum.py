"""The spot engine's momentum strategy: a pure function of closed candles, so live, replay, backtest
and tests all evaluate exactly the same rule.

Enter long when the trend is up (fast EMA above slow EMA, close above the fast EMA), momentum over
the lookback is at least the minimum, RSI sits in the band that means strength without exhaustion,
and the last candle's volume is at least `volume_factor` times its recent average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.types import CandleSeries
from engines.indicators import ema, rsi

VOLUME_AVERAGE_BARS = 20


@dataclass(frozen=True, slots=True)
class MomentumParams:
    ema_fast: int = 9
    ema_slow: int = 21
    rsi_period: int = 14
    rsi_min: float = 50.0
    rsi_max: float = 75.0
    lookback: int = 6
    min_momentum_pct: float = 0.3
    volume_factor: float = 1.0

    @property
    def warmup_bars(self) -> int:
        """Bars needed before the rule can say anything (slow EMA seed plus a margin for RSI)."""
        return max(self.ema_slow, self.rsi_period + 1, self.lookback + 1, VOLUME_AVERAGE_BARS) + 2


@dataclass(frozen=True, slots=True)
class MomentumReading:
    enter: bool
    reason: str
    momentum_pct: float
    rsi: float
    close: float


def evaluate(candles: CandleSeries, p: MomentumParams) -> MomentumReading:
    """Read the newest closed candle. Not enough or non-finite data is a 'no', with the reason."""
    n = len(candles)
    if n < p.warmup_bars:
        return MomentumReading(False, f"warming up ({n}/{p.warmup_bars} bars)", math.nan, math.nan, math.nan)
    window = max(p.warmup_bars * 4, 100)
    close = candles.close[-window:]
    volume = candles.volume[-window:]
    fast = ema(close, p.ema_fast)[-1]
    slow = ema(close, p.ema_slow)[-1]
    strength = rsi(close, p.rsi_period)[-1]
    last = float(close[-1])
    base = float(close[-1 - p.lookback])
    avg_volume = float(np.mean(volume[-VOLUME_AVERAGE_BARS - 1 : -1]))
    values = (fast, slow, strength, last, base, avg_volume)
    if not all(math.isfinite(v) for v in values) or base <= 0:
        return MomentumReading(False, "non-finite data", math.nan, math.nan, last)
    momentum = (last / base - 1.0) * 100.0
    if not (fast > slow and last > fast):
        return MomentumReading(False, "no uptrend", momentum, strength, last)
    if momentum < p.min_momentum_pct:
        return MomentumReading(False, "momentum too weak", momentum, strength, last)
    if not (p.rsi_min <= strength <= p.rsi_max):
        return MomentumReading(False, "rsi outside band", momentum, strength, last)
    if float(volume[-1]) < p.volume_factor * avg_volume:
        return MomentumReading(False, "volume too low", momentum, strength, last)
    return MomentumReading(True, "momentum entry", momentum, strength, last)
