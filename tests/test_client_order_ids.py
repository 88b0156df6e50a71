"""Client order ids: the one thing that keeps a resend from becoming a second order. They must never
repeat, within a process (a block of the persistent sequence at a time) or across restarts (a new boot
stamp and a new block), and Binance must accept them (`^[.A-Z:/a-z0-9_-]{1,36}$`)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.events import EventBus
from exchange.orders import ID_BLOCK, OrderManager, base36, client_order_id_prefix, make_client_order_id
from storage.ledger import Ledger

BINANCE_CLIENT_ID = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
T0 = 1_700_000_000.0


@given(engine=st.sampled_from(["spot", "futures"]), boot=st.integers(0, 2**40), seq=st.integers(0, 2**40))
def test_an_id_is_valid_for_binance_and_reads_back(engine: str, boot: int, seq: int) -> None:
    cid = make_client_order_id(client_order_id_prefix(engine, boot), seq)
    assert BINANCE_CLIENT_ID.match(cid)
    prefix, _, tail = cid.rpartition("-")
    assert prefix == f"ke{engine[0]}{base36(boot)}"
    assert int(tail, 36) == seq and int(prefix[3:], 36) == boot


@settings(max_examples=50, deadline=None)
@given(a=st.tuples(st.integers(0, 2**36), st.integers(0, 2**36)),
       b=st.tuples(st.integers(0, 2**36), st.integers(0, 2**36)))
def test_different_boots_or_sequence_numbers_never_give_the_same_id(a: tuple[int, int], b: tuple[int, int]) -> None:
    def cid(boot: int, seq: int) -> str:
        return make_client_order_id(client_order_id_prefix("spot", boot), seq)

    assert (cid(*a) == cid(*b)) == (a == b)


async def test_ids_of_an_order_manager_never_repeat_across_blocks_and_restarts(tmp_path: Path) -> None:
    """Two processes' order managers on one ledger (a restart): every id of each, past the end of a
    block of the sequence, is new, and each starts with its own boot's prefix."""
    clock = SimClock(T0)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    try:
        seen: set[str] = set()
        for boot in (1234, 1235):
            om = OrderManager("spot", object(), ledger, EventBus(), clock, boot_stamp=boot)  # type: ignore[arg-type]
            for _ in range(ID_BLOCK + 5):
                cid = await om.new_client_order_id()
                assert cid.startswith(client_order_id_prefix("spot", boot))
                assert BINANCE_CLIENT_ID.match(cid)
                assert cid not in seen
                seen.add(cid)
        assert len(seen) == 2 * (ID_BLOCK + 5)
    finally:
        await ledger.close()
