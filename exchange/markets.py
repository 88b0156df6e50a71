"""Market precision and limits for paper trading, where there is no exchange to load them from.

Figures are Binance spot's filters for the bundled symbols (LOT_SIZE stepSize, PRICE_FILTER tickSize,
NOTIONAL minNotional); any other symbol gets conservative defaults, so a paper order is rounded and
limited the way a live one would be.
"""

from __future__ import annotations

from decimal import Decimal

from core.types import MarketInfo, MarketType

_KNOWN: dict[str, tuple[str, str, str]] = {
    # symbol: (amount step, price step, min notional)
    "BTC/USDT": ("0.00001", "0.01", "5"),
    "ETH/USDT": ("0.0001", "0.01", "5"),
    "SOL/USDT": ("0.001", "0.01", "5"),
    "BNB/USDT": ("0.001", "0.01", "5"),
}


def paper_market(symbol: str, market: MarketType = MarketType.SPOT) -> MarketInfo:
    base, _, quote = symbol.partition("/")
    quote = quote.split(":")[0]
    amount_step, price_step, min_notional = _KNOWN.get(symbol.split(":")[0], ("0.001", "0.0001", "5"))
    return MarketInfo(
        symbol=symbol,
        base=base,
        quote=quote,
        market=market,
        amount_step=Decimal(amount_step),
        price_step=Decimal(price_step),
        min_amount=Decimal(amount_step),
        min_notional=Decimal(min_notional) if market is MarketType.SPOT else Decimal("5"),
        max_leverage=1 if market is MarketType.SPOT else 20,
    )


def paper_markets(symbols: list[str], market: MarketType = MarketType.SPOT) -> dict[str, MarketInfo]:
    return {s: paper_market(s, market) for s in symbols}
