"""The owner removes a symbol from SPOT_SYMBOLS while the engine holds it. The next start still prices,
reconciles and manages that position until it is closed, and enters nothing new there; before, the
engine crash-looped on the unknown market ("unknown market ETH/USDT") and the breaker stopped judging
(no price for a held symbol)."""

from __future__ import annotations

from pathlib import Path

from core.types import OrderState, Side
from tests.test_orchestrator_control import first_spot_position, make, running, until

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]


async def test_a_position_in_a_symbol_no_longer_configured_is_managed_until_flat(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        dropped = (await first_spot_position(orch)).symbol
        assert orch.ledger is not None
        known = {o.client_order_id for o in await orch.ledger.recent_orders(10_000)}

    kept = [s for s in SYMBOLS if s != dropped]
    async with running(make(tmp_path, spot_symbols=kept)) as again:
        ledger = again.ledger
        assert ledger is not None
        assert again.feeds["spot"].ticker(dropped) is not None  # still priced
        assert again.parts["spot"].exchange.market(dropped).symbol == dropped

        async def closed() -> bool:
            return dropped not in {p.symbol for p in await ledger.positions("spot")}

        await until(closed, timeout=20)  # its stop-loss or take-profit, at 20,000x
        slot = again.supervisor.slots["spot"]  # type: ignore[union-attr]
        assert slot.attempt <= 1 and slot.last_error is None, slot.last_error  # never crashed
        assert again._books_complete  # the breaker judges the books again
        new = [o for o in await ledger.recent_orders(10_000) if o.client_order_id not in known]
        assert not [o for o in new if o.symbol == dropped and o.side is Side.BUY], "entered a dropped symbol"
        assert [o for o in new if o.symbol in kept and o.state is OrderState.FILLED], "the others still trade"
