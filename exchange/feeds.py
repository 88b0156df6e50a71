"""Market data feeds, in one import: the replay of bundled history and the live Binance feed.

Both implement `exchange.base.MarketFeed`, so engines and the paper exchange cannot tell them apart.
The pieces live in smaller modules (candles: files, validation, resampling; replay; live_feed); this
module is the name the rest of the program imports.
"""

from __future__ import annotations

from exchange.candles import (
    CSV_COLUMNS,
    CandleArrays,
    Rejections,
    load_candles,
    load_candles_async,
    resample,
    timeframe_seconds,
)
from exchange.feed_signal import UpdateSignal
from exchange.live_feed import LiveFeed, loopback_api_urls
from exchange.replay import ReplayFeed, discover_replay_files, parse_replay_filename

__all__ = [
    "CSV_COLUMNS",
    "CandleArrays",
    "LiveFeed",
    "Rejections",
    "ReplayFeed",
    "UpdateSignal",
    "discover_replay_files",
    "load_candles",
    "load_candles_async",
    "loopback_api_urls",
    "parse_replay_filename",
    "resample",
    "timeframe_seconds",
]
