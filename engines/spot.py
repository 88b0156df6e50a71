"""The spot engine: momentum entries on its symbols, exits on stop-loss and take-profit.

It reads only `spot_*` settings and trades only through `BaseEngine.trade` (risk gate, allocator,
order manager). Exits are reduce-only and run on every price update, stale data or not; entries need
fresh data and a newly closed candle (or the scan interval passing without one).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from decimal import Decimal

from core.types import (
    ZERO,
    MarketType,
    Order,
    OrderIntent,
    OrderState,
    OrderType,
    Position,
    PositionSide,
    Side,
    Ticker,
)
from engines.base import BaseEngine, EngineContext
from engines.momentum import MomentumParams, NextBar, evaluate, prepare
from exchange.base import quantize_down, quantize_price

_HUNDRED = Decimal(100)
_LIVE = (OrderState.OPEN, OrderState.PARTIALLY_FILLED)
# Sent or being sent, outcome not yet known (a crash, or an exchange that stopped answering).
_UNSETTLED = (OrderState.PENDING, OrderState.UNKNOWN)
# A protective stop the exchange refused is tried again after this, doubling up to the cap: a passing
# fault (503, 429) heals within a minute, a lasting one does not make the engine hammer the exchange.
STOP_RETRY_SECONDS = 10.0
STOP_RETRY_MAX_SECONDS = 300.0
# How often step() makes sure a position's stop is still live (it may have been cancelled by hand).
STOP_CHECK_SECONDS = 5.0


def _lacks_exit_levels(position: Position) -> bool:
    return position.stop_loss is None or position.take_profit is None


class SpotEngine(BaseEngine):
    name = "spot"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.symbols = list(s.spot_symbols)  # entered and exited; a position elsewhere is only exited
        self._entry_symbols = frozenset(self.symbols)
        self.timeframe = s.spot_timeframe
        self.params = MomentumParams(
            ema_fast=s.spot_ema_fast,
            ema_slow=s.spot_ema_slow,
            rsi_period=s.spot_rsi_period,
            rsi_min=s.spot_rsi_min,
            rsi_max=s.spot_rsi_max,
            lookback=s.spot_momentum_lookback,
            min_momentum_pct=s.spot_min_momentum_pct,
            volume_factor=s.spot_volume_factor,
        )
        self.stop_loss_pct = Decimal(str(s.spot_stop_loss_pct))
        self.take_profit_pct = Decimal(str(s.spot_take_profit_pct))
        self.position_size_pct = Decimal(str(s.spot_position_size_pct))
        self.max_age = s.spot_max_data_age_seconds
        self.scan_interval = s.spot_scan_interval_seconds
        self._last_candle_ts: dict[str, float] = {}
        self._last_scan_at: dict[str, float] = {}
        # Per symbol: the momentum rule's work for the next candle (see `look_ahead`), and the newest
        # candle it was done after.
        self._next_bar: dict[str, NextBar] = {}
        self._next_bar_after: dict[str, float] = {}
        # Per symbol: when step() next looks at the protective stop, and the backoff after a refusal.
        self._stop_next_check: dict[str, float] = {}
        self._stop_backoff: dict[str, float] = {}

    @property
    def wait_seconds(self) -> float:
        return self.ctx.settings.spot_monitor_interval_seconds

    async def load_state(self) -> None:
        """Reload positions; one that lost its exit levels (a crash between the entry fill and saving
        them) gets them again from its entry price, so no position is ever left without a stop. A
        remainder too small to sell is written off first (see `write_off_dust`)."""
        await super().load_state()
        for position in list(self.positions.values()):
            if await self.write_off_dust(position, self.ctx.feed.ticker(position.symbol)):
                continue
            await self._restore_exit_levels(position)
            await self.protect(position, force=True)

    async def step(self) -> None:
        for symbol in self.symbols:
            ticker = self.ctx.feed.ticker(symbol)
            position = self.positions.get(symbol)
            if position is not None:
                await self._manage_held(position, ticker)
                continue
            await self.consider_entry(symbol, ticker)
        if not self._entry_symbols.issuperset(self.positions):
            # Held in a symbol the settings no longer list (the Orchestrator still prices it): exits only.
            for symbol in [s for s in self.positions if s not in self._entry_symbols]:
                position = self.positions.get(symbol)
                if position is not None:
                    await self._manage_held(position, self.ctx.feed.ticker(symbol))
        self.look_ahead()

    async def _restore_exit_levels(self, position: Position) -> bool:
        """Levels from the entry price for a position that has none: a crash between the entry's fill
        and saving them, or an entry the exchange filled only after answering it (its fill reaches the
        ledger later, through the order poll, and `enter` never saw it). Without them the position
        would have no stop-loss, no take-profit and no stop on the exchange. True when restored."""
        if not _lacks_exit_levels(position):
            return False
        await self._set_exit_levels(position)
        self.log.warning("exit levels restored", symbol=position.symbol,
                         stop_loss=str(position.stop_loss), take_profit=str(position.take_profit))
        return True

    async def _manage_held(self, position: Position, ticker: Ticker | None) -> None:
        # The cheap tests first, so the usual tick creates no coroutine for either (it is the exit path).
        if self._unsellable(position, ticker) and await self.write_off_dust(position, ticker):
            return
        if _lacks_exit_levels(position) and await self._restore_exit_levels(position):
            await self.protect(position, force=True)
        if ticker is not None:
            await self.manage_exit(position, ticker)
        # A stop refused earlier (or cancelled by hand) is put back, after the exit so that it never
        # delays one.
        current = self.positions.get(position.symbol)
        if current is not None:
            await self.protect(current)

    def look_ahead(self) -> None:
        """Run the momentum rule's recursions over each symbol's next window but its newest bar now,
        after this step's orders have gone out, so the tick that closes that bar only adds one step
        (`engines.momentum.prepare`). Every symbol, held or not, so the first bar after an exit finds
        it done; once per new candle, a check of the newest candle's time otherwise."""
        for symbol in self.symbols:
            candles = self.ctx.feed.candles(symbol, self.timeframe, limit=self.params.window)
            if candles is None or len(candles) == 0:
                continue
            newest = float(candles.ts[-1])
            if self._next_bar_after.get(symbol) == newest:
                continue
            self._next_bar_after[symbol] = newest
            ahead = prepare(candles, self.params)
            if ahead is None:
                self._next_bar.pop(symbol, None)
            else:
                self._next_bar[symbol] = ahead

    async def write_off_dust(self, position: Position, ticker: Ticker | None) -> bool:
        """Close, in the ledger only, a long position too small to sell: its amount rounds down below the
        market's minimum order, or is worth less than the minimum notional at the bid. Nothing can sell
        or protect it, yet it would block its symbol and count against `spot_max_positions` for ever.
        It is what Binance's default fee leaves (a buy's fee is taken from the coins bought, so the
        step-rounded sale leaves a fraction of a step). Its cost is charged to the trade as a loss; the
        coins stay on the account. Never while an order of the symbol is still working (a partly filled
        stop goes on selling the remainder). True when the position is gone."""
        if not self._unsellable(position, ticker):
            return False
        market = self.ctx.exchange.market(position.symbol)
        price = None if ticker is None else ticker.bid
        working = await self.ctx.ledger.orders_in_states((*_LIVE, *_UNSETTLED), engine=self.ctx.name)
        if any(o.symbol == position.symbol for o in working):
            return False
        closed = await self.ctx.ledger.write_off(self.ctx.name, position.symbol, expected_amount=position.amount,
                                                 reason="below the market's minimum order")
        await self.refresh_positions()
        if closed is not None:
            self.log.warning("position remainder written off: below the market's minimum order",
                             symbol=position.symbol, amount=str(position.amount), bid=str(price),
                             min_amount=str(market.min_amount), min_notional=str(market.min_notional),
                             realized_pnl=str(closed.realized_pnl))
        return position.symbol not in self.positions

    def _unsellable(self, position: Position, ticker: Ticker | None) -> bool:
        """A long position whose amount rounds down below the market's minimum order, or is worth less
        than the minimum notional at the bid (see `write_off_dust`)."""
        if position.side is not PositionSide.LONG:
            return False
        market = self.ctx.exchange.market(position.symbol)
        sellable = quantize_down(position.amount, market.amount_step)
        price = None if ticker is None else ticker.bid
        worthless = price is not None and price > 0 and sellable * price < market.min_notional
        return not (sellable > 0 and sellable >= market.min_amount and not worthless)

    # --- exits -----------------------------------------------------------------------------------
    def exit_reason(self, position: Position, price: Decimal) -> str | None:
        stop = position.stop_loss
        target = position.take_profit
        if stop is not None and price <= stop:
            return "stop-loss"
        if target is not None and price >= target:
            return "take-profit"
        return None

    async def manage_exit(self, position: Position, ticker: Ticker) -> None:
        reason = self.exit_reason(position, ticker.bid)
        if reason is None:
            return
        if not self.ctx.gate.engine_exits_pass():
            return  # HALTED: the Orchestrator's flattening sells; the stop stays until it does
        # The cancelled stops' ledger writes run behind the exit's own order row (see cancel_stop) and
        # are waited for once the exit has gone out, whatever happened to it.
        records: list[Awaitable[object]] = []
        try:
            if await self._clear_protective_stop(position, reason, records):
                await self._exit(position, reason)
        finally:
            await self.await_records(records)

    async def _exit(self, position: Position, reason: str) -> None:
        market = self.ctx.exchange.market(position.symbol)
        amount = quantize_down(position.amount, market.amount_step)
        if amount <= 0:
            return
        intent = OrderIntent(
            engine=self.ctx.name,
            market=MarketType.SPOT,
            symbol=position.symbol,
            side=Side.SELL,
            amount=amount,
            order_type=OrderType.MARKET,
            reduce_only=True,
            reason=reason,
        )
        result = await self.trade(intent)
        if result is not None and result.filled > 0:
            self.counters.exits += 1
            self.log.info("exit", symbol=position.symbol, reason=reason, amount=str(result.filled),
                          price=str(result.order.avg_price))

    # --- entries ---------------------------------------------------------------------------------
    def _due_for_scan(self, symbol: str, newest_candle_ts: float, now: float) -> bool:
        if self._last_candle_ts.get(symbol) != newest_candle_ts:
            return True
        return now - self._last_scan_at.get(symbol, float("-inf")) >= self.scan_interval

    async def consider_entry(self, symbol: str, ticker: Ticker | None) -> None:
        candles = self.ctx.feed.candles(symbol, self.timeframe, limit=self.params.window)
        if candles is None or len(candles) == 0:
            return
        newest = float(candles.ts[-1])
        now = self.clock.now()  # one reading for the scan and freshness checks (a tick's work takes microseconds)
        if not self._due_for_scan(symbol, newest, now):
            return
        self._last_candle_ts[symbol] = newest
        self._last_scan_at[symbol] = now
        if not self.fresh_enough(symbol, ticker, candles, self.max_age, now) or ticker is None:
            return
        max_positions = self.ctx.settings.spot_max_positions
        if len(self.positions) >= max_positions:
            return
        reading = evaluate(candles, self.params, self._next_bar.get(symbol))
        # (The set test first: the usual entry creates no coroutine to learn that nothing is in doubt.)
        if not reading.enter or (symbol in self._entries_in_doubt and await self.entry_in_doubt(symbol)):
            return
        # Entries in doubt in other symbols count as positions: each may still fill. Checked after the
        # signal, where one that has settled is forgotten, so a stale one never blocks for good.
        if self._entries_in_doubt and not await self.room_for_entry(max_positions):
            return
        await self.enter(symbol, ticker, reading.reason)

    def entry_amount(self, symbol: str, price: Decimal) -> Decimal:
        """Position size: a fixed share of the engine's budget, rounded down to the market's step;
        zero when that is below the market's minimum (skip rather than round up)."""
        budget = self.ctx.allocator.budget(self.ctx.name, self.ctx.equity())
        notional = budget * self.position_size_pct / _HUNDRED
        market = self.ctx.exchange.market(symbol)
        amount = quantize_down(notional / price, market.amount_step)
        if amount < market.min_amount or amount * price < market.min_notional:
            return ZERO
        return amount

    async def enter(self, symbol: str, ticker: Ticker, reason: str) -> None:
        price = ticker.ask
        amount = self.entry_amount(symbol, price)
        if amount <= 0:
            self.log.info("entry skipped: below market minimum", symbol=symbol)
            return
        intent = OrderIntent(
            engine=self.ctx.name,
            market=MarketType.SPOT,
            symbol=symbol,
            side=Side.BUY,
            amount=amount,
            order_type=OrderType.MARKET,
            notional=amount * price,
            reason=reason,
        )
        result = await self.trade(intent)
        self.note_entry(symbol, result)
        if result is None or result.filled <= 0:
            return
        self.counters.entries += 1
        position = self.positions.get(symbol)
        if position is None or position.side is not PositionSide.LONG:
            return
        await self._set_exit_levels(position)
        self.log.info("entry", symbol=symbol, amount=str(result.filled), price=str(position.entry_price),
                      stop_loss=str(position.stop_loss), take_profit=str(position.take_profit))
        await self.protect(position, force=True)

    # --- protective stops on the exchange --------------------------------------------------------
    async def _resting_stops(self, symbol: str) -> list[Order]:
        """This engine's stop sells of the symbol that may rest on the exchange. One whose send never
        got a clear answer is settled first (asked for by client order id), so it is never overlooked:
        overlooking it would mean a second stop, or a take-profit selling coins it holds."""
        def stops(orders: list[Order]) -> list[Order]:
            return [o for o in orders
                    if o.symbol == symbol and o.order_type is OrderType.STOP_MARKET and o.side is Side.SELL]

        # One read for both kinds: a take-profit waits on this, and an unsettled stop is rare.
        found = stops(await self.ctx.ledger.orders_in_states((*_UNSETTLED, *_LIVE), engine=self.ctx.name))
        unsettled = [o for o in found if o.state in _UNSETTLED]
        if not unsettled:
            return found
        for order in unsettled:
            await self.ctx.orders.resolve_unknown(order)
        return stops(await self.ctx.ledger.orders_in_states(_LIVE, engine=self.ctx.name))

    async def _live_stop(self, position: Position) -> Order | None:
        """The position's stop on the exchange: the one its meta names or, failing that, a resting stop
        of this symbol for exactly the position's sellable amount that a crash left unlinked (killed
        between the stop's answer and saving its id). Such a stop is adopted, never doubled: a second
        one would be refused, since the first already holds the coins."""
        cid = position.meta.get("stop_order")
        if cid:
            order = await self.ctx.ledger.get_order(cid)
            if order is not None and order.state in _LIVE:
                return order
        sellable = quantize_down(position.amount, self.ctx.exchange.market(position.symbol).amount_step)
        matching = [o for o in await self._resting_stops(position.symbol) if o.amount - o.filled == sellable]
        if not matching:
            return None
        adopted = max(matching, key=lambda o: o.created_at)
        await self._link_stop(position, adopted.client_order_id)
        self.log.warning("protective stop adopted from the ledger", symbol=position.symbol,
                         client_order_id=adopted.client_order_id, was=cid or None)
        return adopted

    async def _cancel_stops(self, symbol: str, records: list[Awaitable[object]] | None = None) -> bool:
        """Cancel every resting stop of the symbol. True when none is left; False when one could not be
        cancelled (no answer: retried at the next step) or had filled (the exchange sold: positions are
        reloaded and nothing is sold again). `records`: see `cancel_stop`."""
        all_gone = True
        for order in await self._resting_stops(symbol):
            settled = await self.cancel_stop(order, records)
            if settled is None:
                all_gone = False
                continue
            # REJECTED: the exchange never had it (an unknown send settled as never placed).
            if settled.state not in (OrderState.CANCELED, OrderState.REJECTED) or settled.filled > 0:
                all_gone = False
                self.log.info("protective stop not cancelled", symbol=symbol,
                              client_order_id=order.client_order_id, state=str(settled.state),
                              filled=str(settled.filled))
        if not all_gone:
            await self.refresh_positions()
        return all_gone

    async def _link_stop(self, position: Position, client_order_id: str) -> None:
        meta = {**position.meta, "stop_order": client_order_id}
        await self.ctx.ledger.update_position(self.ctx.name, position.symbol, meta=meta)
        # trade() reloads the positions: the engine's current copy must learn about the stop too, or a
        # take-profit would sell coins the resting stop still holds.
        for copy in (position, self.positions.get(position.symbol)):
            if copy is not None:
                copy.meta = dict(meta)

    async def protect(self, position: Position, *, force: bool = False) -> None:
        """Put the position's stop-loss on the exchange, so a crashed or frozen daemon leaves no position
        unprotected. Without one (refused, below the minimum) the engine stops the position out itself
        and tries again after a backoff. From `step()` the check is throttled (`force` after an entry
        and at start-up), so an idle position costs a ledger read every few seconds, not every tick."""
        symbol = position.symbol
        if position.stop_loss is None:
            return
        if not self.ctx.gate.engine_exits_pass():
            return  # HALTED: a stop would be refused, and replacing one that does not fit would cancel it first
        now = self.clock.now()
        if force:  # a new position (or a new process): a backoff earned by an earlier one does not apply
            self._stop_backoff.pop(symbol, None)
        elif now < self._stop_next_check.get(symbol, -math.inf):
            return
        if await self._live_stop(position) is not None:
            self._stop_next_check[symbol] = now + STOP_CHECK_SECONDS
            self._stop_backoff.pop(symbol, None)
            return
        market = self.ctx.exchange.market(symbol)
        amount = quantize_down(position.amount, market.amount_step)
        if amount <= 0:
            return
        # A resting stop that does not fit the position (left by an earlier one) holds coins the new stop
        # needs: on spot it must go first. The gap lasts one cancel and one send, and is logged.
        if await self._resting_stops(symbol):
            self.log.warning("replacing a protective stop that does not fit the position", symbol=symbol)
            if not await self._cancel_stops(symbol):
                self._stop_next_check[symbol] = self.clock.now() + STOP_RETRY_SECONDS
                return
            if symbol not in self.positions:
                return
        intent = OrderIntent(
            engine=self.ctx.name, market=MarketType.SPOT, symbol=symbol, side=Side.SELL,
            amount=amount, order_type=OrderType.STOP_MARKET, stop_price=position.stop_loss,
            reduce_only=True, reason="protective stop",
        )
        result = await self.trade(intent)
        if result is None or result.order.state not in _LIVE:
            delay = self._stop_backoff.get(symbol, STOP_RETRY_SECONDS)
            self._stop_backoff[symbol] = min(delay * 2, STOP_RETRY_MAX_SECONDS)
            self._stop_next_check[symbol] = self.clock.now() + delay
            self.log.warning("no protective stop on the exchange; the engine stops the position out itself "
                             "and tries again", symbol=symbol, retry_in_seconds=delay,
                             error=None if result is None else result.error)
            return
        self._stop_backoff.pop(symbol, None)
        self._stop_next_check[symbol] = self.clock.now() + STOP_CHECK_SECONDS
        await self._link_stop(position, result.order.client_order_id)
        self.log.info("protective stop placed", symbol=symbol, stop_price=str(position.stop_loss),
                      amount=str(amount), client_order_id=result.order.client_order_id)

    async def _clear_protective_stop(self, position: Position, reason: str,
                                     records: list[Awaitable[object]]) -> bool:
        """Before the engine sells, the exchange's stops must be gone, or both could sell the same coins.
        A stop-loss is left to the exchange's own stop order; a take-profit cancels every resting stop of
        the symbol first. Returns True when the engine may sell now."""
        # The reason first: a take-profit cancels every resting stop anyway, so it need not look up
        # (or adopt) the position's own before doing so.
        if reason == "stop-loss" and await self._live_stop(position) is not None:
            return False
        return await self._cancel_stops(position.symbol, records)

    async def _set_exit_levels(self, position: Position) -> None:
        market = self.ctx.exchange.market(position.symbol)
        entry = position.entry_price
        stop = quantize_price(entry * (1 - self.stop_loss_pct / _HUNDRED), market.price_step)
        target = quantize_price(entry * (1 + self.take_profit_pct / _HUNDRED), market.price_step)
        await self.ctx.ledger.update_position(self.ctx.name, position.symbol, stop_loss=stop,
                                              take_profit=target)
        position.stop_loss = stop
        position.take_profit = target
