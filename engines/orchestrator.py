"""The Orchestrator: staged start-up, one task per enabled engine, the supervisor loop, the breaker,
graceful shutdown, and the `Control` protocol that Telegram and the health endpoint drive.

Start-up runs in stages, each with a timeout and a log line, stopping at the first that fails:
ledger, market connection, reconciliation, risk state, engines, supervisor, Telegram. Shutdown runs
in reverse and ends by logging the final portfolio.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import structlog

from config import TIMEFRAME_SECONDS, Settings
from core.clock import Clock
from core.errors import ConfigError, DependencyError, KineticError, OperationalError, TemporaryError
from core.events import (
    BreakerBlind,
    DaemonStarted,
    DaemonStopping,
    EnginePaused,
    Event,
    EventBus,
    FlattenStuck,
    PortfolioReported,
    RiskRebased,
    Subscription,
    TradingStateChanged,
)
from core.types import (
    ZERO,
    MarketType,
    Order,
    OrderIntent,
    OrderState,
    OrderType,
    Position,
    PositionSide,
    TradingState,
)
from engines.base import BaseEngine, EngineContext
from engines.futures import FuturesEngine
from engines.reconcile import reconcile_engine
from engines.spot import SpotEngine
from engines.supervisor import SlotState, Supervisor
from exchange.base import Exchange, MarketFeed, OrderRequest, OrderUpdate, quantize_down
from exchange.ccxt_client import CcxtExchange
from exchange.feeds import LiveFeed, ReplayFeed, discover_replay_files, loopback_api_urls
from exchange.markets import paper_markets
from exchange.orders import OrderManager
from exchange.paper import PaperExchange
from exchange.paper_futures import FundingPayment, PaperFuturesExchange
from exchange.ratelimit import BudgetRegistry
from monitoring.control import (
    ENGINE_TARGETS,
    BalanceReport,
    BreakerReport,
    CommandResult,
    DailyPnl,
    EngineStatus,
    StatusReport,
    TradeRecord,
)
from monitoring.health import HealthMonitor, RestartPolicy
from monitoring.operations import Operations
from monitoring.systemd import SystemdNotifier
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits, RiskState, Transition
from storage.ledger import Ledger

log = structlog.get_logger("orchestrator")

T = TypeVar("T")

ENGINE_CLASSES: dict[str, type[BaseEngine]] = {"spot": SpotEngine, "futures": FuturesEngine}
FUTURES_TIMEFRAMES = ["15m", "1h", "4h"]
FUNDING_KIND = "FundingPaid"
MARKET_OF = {"spot": MarketType.SPOT, "futures": MarketType.FUTURES}
RISK_KEY = "risk"
STATUS_LOG_SECONDS = 60.0  # how often the engines' status and the portfolio are logged
# How long the breaker may go without a complete figure (a balance or a held price missing) before the
# owner is alerted: no limit is checked meanwhile.
BREAKER_BLIND_ALERT_SECONDS = 300.0
PAUSE_KEY = "pause"
# A flattening (kill, or a trip with global_flatten_on_trip) not finished yet: a restart takes it up again.
FLATTEN_KEY = "flatten"
# How long a flattening may leave positions open before the owner is told (FlattenStuck), and how often
# that is said again while it lasts. A few passes are normal (an answer in doubt, a price not in yet);
# some leftovers (coins gone from the account, a position the exchange no longer has, a remainder below
# the market's minimum) no pass can close: only a person can.
FLATTEN_STUCK_ALERT_SECONDS = 120.0
FLATTEN_STUCK_REPEAT_SECONDS = 1800.0
# What an exchange call may raise that is about the exchange, not the daemon: logged, then retried later.
_EXCHANGE_TROUBLE = (TimeoutError, TemporaryError, DependencyError, OperationalError)


class StartupError(KineticError):
    """A start-up stage failed; the message says which and what to do."""


class StartupAborted(KineticError):
    """A stop was requested while starting: shut down cleanly before any further stage runs."""


def lock_data_dir(data_dir: Path) -> Any:
    """An exclusive advisory lock on DATA_DIR/daemon.lock, held for the life of the process (the OS
    drops it if the process dies, so a SIGKILL never leaves it stale)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = (data_dir / "daemon.lock").open("a+")
    except OSError as exc:  # a file in its place, no permission, a read-only or full disk
        raise OperationalError(
            f"DATA_DIR={data_dir} cannot be used: {exc.strerror or exc} ({exc.filename or data_dir})"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OperationalError(
            f"another Kinetic Empire process is already running on DATA_DIR={data_dir}; stop it first"
        ) from None
    return handle


@dataclass
class EngineParts:
    """The per-engine services that outlive engine restarts."""

    name: str
    exchange: Exchange
    orders: OrderManager
    context: EngineContext
    trade_lock: asyncio.Lock


@dataclass
class EngineBook:
    equity: Decimal = ZERO
    realized: Decimal = ZERO
    unrealized: Decimal = ZERO
    positions: tuple[Position, ...] = ()


@dataclass(slots=True)
class FlattenPass:
    """What one flattening pass left open, and why: what the owner's FlattenStuck alert says. A reason
    is noted (`why`) where the pass gives up on a symbol, the same places that log it; what is left
    (`left`, the counts) comes from the ledger after the pass (`_left_to_flatten`), like its result."""

    why: dict[tuple[str, str], str] = field(default_factory=dict)  # (engine, symbol) -> reason
    left: dict[tuple[str, str], str] = field(default_factory=dict)  # still open -> reason
    positions: int = 0
    orders: int = 0  # orders whose outcome is not known yet


class Orchestrator:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        replay_path: Path | None = None,
        speed: float | None = None,
        notifier: SystemdNotifier | None = None,
        telegram_base_url: str | None = None,
    ) -> None:
        if replay_path is not None and settings.trading_mode != "paper":
            # The prices would be recorded ones and the orders real (main.py refuses it first).
            raise ConfigError([f"TRADING_MODE={settings.trading_mode}: a replay trades on recorded prices "
                               f"and runs only with TRADING_MODE=paper"])
        self.settings = settings
        self.clock = clock
        self.replay_path = replay_path
        self.speed = speed if speed is not None else settings.replay_speed
        self.bus = EventBus()
        self.health = HealthMonitor(clock, settings.health_warning_seconds, settings.health_restart_seconds)
        self.policy = RestartPolicy(
            settings.health_max_restarts,
            settings.health_restart_window_seconds,
            settings.health_backoff_base_seconds,
            settings.health_backoff_max_seconds,
        )
        self.ops = Operations(settings, clock, self.bus, notifier=notifier, telegram_base_url=telegram_base_url)
        self.ledger: Ledger | None = None
        self.feed: MarketFeed | None = None
        self.feeds: dict[str, MarketFeed] = {}
        self.parts: dict[str, EngineParts] = {}
        self.allocator: CapitalAllocator | None = None
        self.monitor: GlobalRiskMonitor | None = None
        self.gate: RiskGate | None = None
        self.supervisor: Supervisor | None = None
        self.books: dict[str, EngineBook] = {}
        self._equity = ZERO
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._started_at = clock.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._engine_tasks: set[asyncio.Task[None]] = set()
        self._risk_dirty = False
        self._crashed = False
        self._books_complete = False
        self._balance_failing: set[str] = set()  # engines whose last balance read failed (logged once)
        self._held_elsewhere: dict[str, list[str]] = {}  # see _find_held_symbols
        self._risk_waiting = False  # the breaker skipped incomplete books (logged once per spell)
        self._risk_waiting_since = 0.0  # monotonic start of that spell
        self._risk_blind_alerted = False  # the owner was told the spell lasts (BreakerBlind)
        self._unpriced: set[str] = set()  # held symbols the last book had no price for
        self._next_report = clock.monotonic() + STATUS_LOG_SECONDS
        self._flatten_task: asyncio.Task[Any] | None = None
        self._flatten_wanted: tuple[bool, str] = (False, "")
        self._flatten_pass = FlattenPass()  # the current (or last) pass of the flattening
        self._lock_file: Any = None
        self._journal_sub: Subscription | None = None
        self.ready = asyncio.Event()

    # --- public ----------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        feed = "replay" if self.replay_path is not None else "live data"
        return f"{self.settings.trading_mode} ({feed})"

    @property
    def crashed(self) -> bool:
        """True when the stop was forced by a broken invariant: main exits 1 so systemd restarts us."""
        return self._crashed

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stop requested", reason=reason)
            self._stop_reason = reason
            self._stop.set()

    async def run(self) -> None:
        """Start, supervise until asked to stop, shut down. Raises StartupError if a stage fails."""
        try:
            await self._startup()
            self.ready.set()
            await self._stop.wait()
        finally:
            await self._shutdown()

    # --- start-up --------------------------------------------------------------------------------
    async def _stage(self, name: str, make: Callable[[], Awaitable[T]], *, stoppable: bool = True) -> T:
        """One start-up stage, bounded by the stage timeout. A stop requested meanwhile (SIGTERM) ends it
        at once: the stage is cancelled, which every stage can take (the next start does it again), and
        the daemon shuts down instead of waiting up to the timeout for the stage to finish. Not the
        ledger's opening (`stoppable=False`), which is quick and must not be left half done."""
        if self._stop.is_set():
            raise StartupAborted(f"stop requested before start-up stage '{name}'")
        timeout = self.settings.startup_stage_timeout_seconds
        started = self.clock.monotonic()
        log.info("start-up stage", stage=name)
        self.ops.starting(name)
        work = asyncio.ensure_future(make())
        waits = {work, asyncio.ensure_future(self._stop.wait())} if stoppable else {work}
        try:
            await self.clock.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), timeout)
        except TimeoutError:
            raise StartupError(f"start-up stage '{name}' did not finish within {timeout:g}s") from None
        finally:
            for task in waits:
                task.cancel()
            await asyncio.wait(waits)
        if work.cancelled():
            raise StartupAborted(f"stop requested during start-up stage '{name}'")
        try:
            result = work.result()
        except KineticError as exc:
            raise StartupError(f"start-up stage '{name}' failed: {exc}") from exc
        log.info("start-up stage done", stage=name, seconds=round(self.clock.monotonic() - started, 3))
        return result

    def _own(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._stop.is_set():
            # A service task (supervisor, feed, journal) dying is a broken invariant: stop cleanly and
            # let systemd restart us from the ledger.
            log.error("service task died", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._crashed = True
            self.request_stop(f"service task {task.get_name()} died")

    async def _startup(self) -> None:
        s = self.settings
        if s.trading_mode == "live":
            log.warning("LIVE TRADING: REAL MONEY, REAL ORDERS ON BINANCE", mode="LIVE")
        elif s.trading_mode == "testnet":
            log.warning("testnet mode: Binance demo trading endpoints", mode="testnet")
        self.ledger = await self._stage("ledger", self._open_ledger, stoppable=False)
        self._journal_sub = self.bus.subscribe("journal", maxsize=50_000)
        self._own(self._journal_writer(self._journal_sub), "journal")
        await self._stage("market connection", self._connect_market)
        await self._stage("reconciliation", self._reconcile)
        await self._stage("risk state", self._load_risk_state)
        await self._stage("engines", self._start_engines)
        await self._stage("supervisor", self._start_supervisor)
        await self._stage("operations", lambda: self.ops.start(self))
        await self._refresh_books()
        risk = self._monitor().state
        self.bus.publish(DaemonStarted(ts=self.clock.now(), mode=self.mode, engines=tuple(self.parts),
                                       equity=self._equity, trading_state=risk.trading_state,
                                       state_reason=risk.reason))
        log.info("daemon started", mode=self.mode, engines=list(self.parts), equity=str(self._equity),
                 trading_state=str(self.trading_state))
        self.ops.ready(f"trading {self.trading_state.value}: {', '.join(self.parts)}")

    async def _open_ledger(self) -> Ledger:
        """Take DATA_DIR for this process alone first: two daemons on one ledger would both trade."""
        self._lock_file = await asyncio.to_thread(lock_data_dir, self.settings.data_dir)
        return await Ledger.open(self.settings.ledger_path, self.clock)

    async def _connect_market(self) -> None:
        s = self.settings
        engines = s.enabled_engines()
        await self._find_held_symbols(engines)
        symbols = sorted({sym for name in engines for sym in self._symbols_of(name)})
        if self.replay_path is not None:
            files = await asyncio.to_thread(discover_replay_files, self.replay_path)
            missing = [sym for sym in symbols if sym not in files]
            if missing:
                raise OperationalError(
                    f"no replay data for {', '.join(missing)} in {self.replay_path}; "
                    f"set SPOT_SYMBOLS to some of {', '.join(sorted(files))}"
                )
            cursor = await self._ledger().get_state(self._cursor_key())
            self.feed = ReplayFeed(
                {sym: files[sym] for sym in symbols}, self.clock,
                base_timeframe=self._replay_base(engines), speed=self.speed,
                warmup_bars=s.replay_warmup_bars, start_cursor=int(cursor["cursor"]) if cursor else None,
                spread_bps=s.paper_spread_bps,
            )
            self.feeds = {name: self.feed for name in engines}
        else:
            for name in engines:
                market = MARKET_OF[name]
                urls = loopback_api_urls(s.exchange_url_override, market) if s.exchange_url_override else None
                if name == "spot":
                    feed: MarketFeed = LiveFeed(
                        self.clock, self._symbols_of(name), [s.spot_timeframe], market_type=market,
                        poll_seconds=s.spot_monitor_interval_seconds,
                        candle_poll_seconds=min(60.0, s.spot_scan_interval_seconds),
                        timeout_seconds=s.exchange_timeout_seconds, urls=urls,
                    )
                else:
                    feed = LiveFeed(
                        self.clock, self._symbols_of(name), FUTURES_TIMEFRAMES, market_type=market,
                        poll_seconds=s.futures_monitor_interval_seconds,
                        candle_poll_seconds=min(60.0, s.futures_scan_interval_seconds),
                        timeout_seconds=s.exchange_timeout_seconds, urls=urls,
                        candle_limit=max(500, s.futures_candle_limit),
                    )
                self.feeds[name] = feed
            self.feed = self.feeds[engines[0]]
        for feed in {id(f): f for f in self.feeds.values()}.values():
            await feed.start()
        if s.trading_mode != "paper":
            budgets = BudgetRegistry(self.clock, share=s.exchange_weight_share_pct / 100)
            for name in engines:
                client = CcxtExchange.from_settings(s, MARKET_OF[name], self.clock, budgets=budgets,
                                                    on_request=self._request_observer(name))
                self._add_engine_parts(name, client)
                await client.load_markets()
                missing = [sym for sym in self._symbols_of(name) if not self._has_market(client, sym)]
                if missing:
                    raise OperationalError(f"{name}: the exchange lists no market for {', '.join(missing)}")
            return
        shares = self._paper_wallets(engines)
        for name in engines:
            market = MARKET_OF[name]
            markets = paper_markets(self._symbols_of(name), market)
            exchange: PaperExchange | PaperFuturesExchange
            if market is MarketType.SPOT:
                exchange = PaperExchange(
                    market, self.feeds[name], self.clock, markets, {"USDT": shares[name]},
                    taker_fee_pct=s.paper_taker_fee_pct, maker_fee_pct=s.paper_maker_fee_pct,
                    slippage_bps=s.paper_slippage_bps,
                )
            else:
                # Binance USD-M's standard fees (0.05% taker, 0.02% maker) and funding; not spot's.
                exchange = PaperFuturesExchange(
                    self.feeds[name], self.clock, markets, shares[name], slippage_bps=s.paper_slippage_bps,
                    on_funding=self._record_funding,
                )
            await exchange.load_markets()
            self._add_engine_parts(name, exchange)

    def _paper_wallets(self, engines: list[str]) -> dict[str, Decimal]:
        """Split the paper balance into one wallet per engine, as Binance keeps spot and futures apart;
        an unallocated remainder stays in the first engine's wallet (it is idle cash, not budget)."""
        s = self.settings
        allocator = CapitalAllocator(
            {"spot": s.spot_allocation_pct, "futures": s.futures_allocation_pct}, engines
        )
        wallets = {name: s.paper_starting_balance * allocator.share_pct(name) / 100 for name in engines}
        rest = s.paper_starting_balance - sum(wallets.values(), ZERO)
        wallets[engines[0]] += rest
        return wallets

    def _request_observer(self, engine: str) -> Callable[[str, float, str | None], None] | None:
        metrics = self.ops.metrics
        if metrics is None:
            return None

        def observe(endpoint: str, seconds: float, error_kind: str | None) -> None:
            metrics.observe_request(engine, endpoint, seconds, error_kind)

        return observe

    @staticmethod
    def _has_market(exchange: Exchange, symbol: str) -> bool:
        try:
            exchange.market(symbol)
        except KineticError:
            return False
        return True

    def _symbols_of(self, engine: str) -> list[str]:
        """The symbols an engine trades (its settings), then those it still holds a position or a resting
        order in although they are no longer in its settings: priced, reconciled and managed until flat,
        never entered (see `_find_held_symbols`)."""
        configured = self._configured_symbols(engine)
        return configured + [sym for sym in self._held_elsewhere.get(engine, []) if sym not in configured]

    def _configured_symbols(self, engine: str) -> list[str]:
        if engine == "spot":
            return list(self.settings.spot_symbols)
        if engine == "futures":
            return list(self.settings.futures_symbols)
        return []

    async def _find_held_symbols(self, engines: list[str]) -> None:
        """Symbols with a position or a resting order of an engine that its settings no longer list (the
        owner edited SPOT_SYMBOLS with a trade open): without a price and a market for them the engine
        could neither exit nor protect the position, and the breaker could not value it."""
        ledger = self._ledger()
        for name in engines:
            configured = set(self._configured_symbols(name))
            held = {p.symbol for p in await ledger.positions(name)}
            held |= {o.symbol for o in await ledger.orders_in_states(
                [OrderState.OPEN, OrderState.PARTIALLY_FILLED, OrderState.PENDING, OrderState.UNKNOWN],
                engine=name)}
            extra = sorted(held - configured)
            self._held_elsewhere[name] = extra
            if extra:
                log.warning("held in symbols no longer configured: managed until flat, never entered",
                            engine=name, symbols=extra)

    def _replay_base(self, engines: list[str]) -> str:
        """One replay feeds both engines: its step must divide the futures engine's 15m bars."""
        spot_tf = self.settings.spot_timeframe
        if "futures" in engines and TIMEFRAME_SECONDS[spot_tf] > TIMEFRAME_SECONDS["15m"]:
            return "15m" if TIMEFRAME_SECONDS[spot_tf] % TIMEFRAME_SECONDS["15m"] == 0 else "5m"
        return spot_tf

    def _record_funding(self, payment: FundingPayment) -> None:
        """Paper funding changes the futures wallet; journaled so a restart can replay it exactly."""
        self._own(self._ledger().journal(FUNDING_KIND, {
            "symbol": payment.symbol, "amount": str(payment.amount), "rate": str(payment.rate),
            "ts": payment.ts}, payment.ts), "funding")

    def _cursor_key(self) -> str:
        path = self.replay_path.resolve() if self.replay_path is not None else None
        return f"replay_cursor:{path}"

    def _add_engine_parts(self, name: str, exchange: Exchange) -> None:
        orders = OrderManager(name, exchange, self._ledger(), self.bus, self.clock,
                              send_timeout=self.settings.exchange_timeout_seconds,
                              unknown_grace_seconds=self.settings.order_unknown_grace_seconds)
        if isinstance(exchange, PaperExchange | PaperFuturesExchange):
            def on_fill(update: OrderUpdate, om: OrderManager = orders) -> None:
                self._own(self._late_fill(om, update), "late-fill")

            exchange.on_fill = on_fill
        self.parts[name] = EngineParts(name=name, exchange=exchange, orders=orders,
                                       context=None, trade_lock=asyncio.Lock())  # type: ignore[arg-type]

    async def _late_fill(self, orders: OrderManager, update: Any) -> None:
        """A resting order (a protective stop) filled between engine steps, or the exchange liquidated a
        position: record it like any other answer. A liquidation has no order row of ours."""
        order = await self._ledger().get_order(update.client_order_id)
        if order is not None:
            await orders.apply_update(order, update, notify=True)
        else:
            await orders.record_foreign_fills(update)

    async def _reconcile(self) -> None:
        """Bring the ledger and the (paper) exchange into agreement before any engine trades."""
        ledger = self._ledger()
        for name, part in self.parts.items():
            if isinstance(part.exchange, PaperExchange | PaperFuturesExchange):
                fills = await ledger.fills(engine=name)
                resting = await ledger.orders_in_states([OrderState.OPEN, OrderState.PARTIALLY_FILLED],
                                                         engine=name)
                requests = [
                    OrderRequest(o.client_order_id, o.symbol, o.side, o.order_type, o.amount,
                                 o.price, o.stop_price, o.reduce_only, o.leverage) for o in resting
                ]
                if isinstance(part.exchange, PaperExchange):
                    part.exchange.restore(fills, requests)
                else:
                    funding = [
                        FundingPayment(r["payload"]["symbol"], Decimal(r["payload"]["amount"]),
                                       Decimal(r["payload"]["rate"]), float(r["payload"]["ts"]))
                        for r in reversed(await ledger.read_journal(FUNDING_KIND, limit=10_000_000))
                    ]
                    leverage = {p.symbol: p.leverage for p in await ledger.positions(name)}
                    leverage.update({o.symbol: o.leverage for o in resting if o.leverage})
                    part.exchange.restore(fills, requests, funding, leverage)
            await reconcile_engine(name, part.exchange, part.orders, ledger, self._symbols_of(name),
                                   self.bus, self.clock)
            await part.orders.reserve_ids()

    async def _load_risk_state(self) -> None:
        s = self.settings
        ledger = self._ledger()
        engines = list(self.parts)
        self.allocator = CapitalAllocator(
            {"spot": s.spot_allocation_pct, "futures": s.futures_allocation_pct}, engines
        )
        saved = await ledger.get_state(RISK_KEY)
        state = RiskState.from_dict(saved) if saved else None
        self.monitor = GlobalRiskMonitor(RiskLimits.from_settings(s), state)
        limits = {
            "spot": EngineLimits(max_positions=s.spot_max_positions, max_leverage=1),
            "futures": EngineLimits(max_positions=s.futures_max_positions, max_leverage=s.futures_max_leverage),
        }
        self.gate = RiskGate(self.monitor, self.allocator, limits)
        paused = await ledger.get_state(PAUSE_KEY) or {}
        for name in engines:
            if paused.get(name):
                self.gate.set_paused(name, True)
                log.warning("engine paused (from ledger)", engine=name)
        await self._await_prices()
        await self._refresh_books()
        await self._update_risk()
        log.info("risk state", trading_state=str(self.monitor.trading_state),
                 reason=self.monitor.state.reason, until=self.monitor.state.until,
                 equity=str(self._equity))

    async def _start_engines(self) -> None:
        s = self.settings
        self.supervisor = Supervisor(self.clock, self.bus, self.health, self.policy,
                                     stop_timeout=s.health_stop_timeout_seconds, spawn=self._spawn_engine)
        for name, part in self.parts.items():
            part.context = EngineContext(
                name=name, settings=s, clock=self.clock, bus=self.bus, ledger=self._ledger(),
                exchange=part.exchange, feed=self.feeds[name], gate=self._gate(), allocator=self._allocator(),
                health=self.health, orders=part.orders, equity=lambda: self._equity,
                trade_lock=part.trade_lock,
            )
            part.orders.on_position_change = part.context.note_position_change
            cls = ENGINE_CLASSES[name]
            self.supervisor.add(name, functools.partial(cls, part.context))
            self.supervisor.start(name)
        for name in ("spot", "futures"):
            if name not in self.parts:
                log.info("engine disabled", engine=name)

    def _spawn_engine(self, name: str, engine: BaseEngine) -> asyncio.Task[None]:
        assert self.supervisor is not None
        task = asyncio.ensure_future(self.supervisor.guard(name, engine))
        task.set_name(f"engine:{name}")
        self._engine_tasks.add(task)
        task.add_done_callback(self._engine_tasks.discard)
        return task

    async def _start_supervisor(self) -> None:
        for name, part in self.parts.items():
            if isinstance(part.exchange, PaperExchange | PaperFuturesExchange):
                self._own(part.exchange.run(), f"paper:{name}")
            else:
                self._own(self._poll_orders(part), f"order-poll:{name}")
        self._own(self._supervise(), "supervisor")
        await self._resume_flatten()

    # --- supervision -----------------------------------------------------------------------------
    def _feed_died(self) -> bool:
        """A market feed whose own task died sends no more prices: engines would go on beating and
        only warn of stale data. That is a crash: stop, and let systemd restart from the ledger."""
        for feed in {id(f): f for f in self.feeds.values()}.values():
            exc = feed.failure()
            if exc is not None:
                log.error("market feed died", feed=type(feed).__name__, error=repr(exc), exc_info=exc)
                self._crashed = True
                self.request_stop("market feed died")
                return True
        return False

    def _ledger_refused_a_sent_order(self) -> bool:
        """An order went out on its intent-log row and the database then refused the row (disk full, a
        broken invariant). The ledger no longer sends before committing, but the refused rows are only
        in the intent log, which only a new open reads: stop as a crash, and the restart commits them
        and reconciles them with the exchange before anything trades."""
        exc = None if self.ledger is None else self.ledger.order_failure()
        if exc is None:
            return False
        log.error("the ledger refused an order row after the order was sent; restarting to recover it "
                  "from the intent log", error=repr(exc), exc_info=exc)
        self._crashed = True
        self.request_stop("ledger refused a sent order's row")
        return True

    async def _supervise(self) -> None:
        """The supervisor tick. Reading the books asks the exchange for balances, which live can take
        tens of seconds of timeouts and retries: that read runs in a task of its own, and a tick waits
        for it at most one interval, so the engines' supervision and systemd's watchdog ping never wait
        on a slow exchange. The breaker judges each completed read."""
        sup = self._supervisor()
        interval = self.settings.health_check_interval_seconds
        books: asyncio.Task[None] | None = None
        slow_logged = False  # a read has run past a tick (logged once per spell)
        try:
            while not self._stop.is_set():
                if self._feed_died() or self._ledger_refused_a_sent_order():
                    return
                await sup.tick()
                if books is None:
                    books = asyncio.ensure_future(self._refresh_books())
                    books.set_name("books")
                if not books.done():
                    with contextlib.suppress(TimeoutError):
                        await self.clock.wait_for(asyncio.shield(books), interval)
                if books.done():
                    done, books, slow_logged = books, None, False
                    done.result()  # (what it raises is a broken invariant: the supervisor dies of it)
                    await self._update_risk()
                elif not slow_logged:
                    slow_logged = True
                    log.warning("books not read within a supervisor tick: the exchange is slow; the breaker "
                                "judges the next complete read", waited_seconds=interval)
                await self._persist_progress()
                if self.ops.metrics is not None:
                    self.ops.metrics.set_orders_by_state(await self._ledger().order_counts_by_state())
                self.ops.tick(await self.status())
                if self.clock.monotonic() >= self._next_report:
                    self._next_report = self.clock.monotonic() + STATUS_LOG_SECONDS
                    self._log_engine_status()
                    self._report_portfolio(final=False)
                due = sup.next_restart_due()
                wait = interval if due is None else max(0.0, min(interval, due - self.clock.monotonic()))
                sup.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await self.clock.wait_for(sup.wake.wait(), wait)
        finally:
            if books is not None and not books.done():
                books.cancel()
                await asyncio.wait({books})

    async def _poll_orders(self, part: EngineParts) -> None:
        """Live and testnet: learn about fills of orders resting on the exchange (a protective stop
        that fired) within a few seconds, not only at the next start-up."""
        interval = max(2.0, self.settings.spot_monitor_interval_seconds)
        while True:
            await self.clock.sleep(interval)
            async with part.trade_lock:
                await part.orders.poll_open_orders()

    async def _refresh_books(self) -> None:
        """Each engine's equity, P&L and positions. An engine whose balance the exchange does not give
        (no answer, refused) keeps its last book and the books count as incomplete, so the breaker
        waits for a true figure instead of judging a guess; the supervisor goes on either way."""
        ledger = self._ledger()
        complete = True
        unpriced: set[str] = set()
        for name, part in self.parts.items():
            try:
                balance = await part.exchange.fetch_balance()
            except _EXCHANGE_TROUBLE as exc:
                complete = False
                if name not in self._balance_failing:
                    self._balance_failing.add(name)
                    log.warning("balance unavailable: the breaker waits for it", engine=name, error=repr(exc))
                continue
            if name in self._balance_failing:
                self._balance_failing.discard(name)
                log.info("balance available again", engine=name)
            positions = tuple(await ledger.positions(name))
            unrealized = ZERO
            for p in positions:
                ticker = self.feeds[name].ticker(p.symbol)
                if ticker is not None:
                    unrealized += p.unrealized_pnl(ticker.bid if p.side is PositionSide.LONG else ticker.ask)
                else:
                    complete = False
                    unpriced.add(p.symbol)
            realized = await ledger.realized_pnl(name)
            self.books[name] = EngineBook(balance.equity, realized, unrealized, positions)
        self._equity = sum((book.equity for book in self.books.values()), ZERO)
        # Equity without a price for every held position undercounts it (a coin with no price is worth
        # nothing to the paper books): the breaker must not judge such a figure.
        self._books_complete = complete and len(self.books) == len(self.parts)
        self._unpriced = unpriced

    async def _update_risk(self) -> None:
        if not self._books_complete:
            if not self._risk_waiting:  # once per spell, not every tick
                self._risk_waiting = True
                self._risk_waiting_since = self.clock.monotonic()
                log.warning("risk check waits: the books are incomplete (a held symbol without a price, or a "
                            "balance the exchange did not give)")
            elif (not self._risk_blind_alerted
                  and self.clock.monotonic() - self._risk_waiting_since >= BREAKER_BLIND_ALERT_SECONDS):
                # A moment without a figure is normal (a slow read, prices at start-up); a long one means
                # no limit is checked, which the owner must hear about, not only the log.
                self._risk_blind_alerted = True
                detail = self._missing_books()
                log.error("the breaker cannot judge: the books stay incomplete", missing=detail,
                          minutes=round(BREAKER_BLIND_ALERT_SECONDS / 60))
                self.bus.publish(BreakerBlind(ts=self.clock.now(), blind=True, detail=detail,
                                              seconds=self.clock.monotonic() - self._risk_waiting_since))
            return
        if self._risk_waiting:
            self._risk_waiting = False
            log.info("risk check resumed: the books are complete again")
            if self._risk_blind_alerted:
                self._risk_blind_alerted = False
                self.bus.publish(BreakerBlind(ts=self.clock.now(), blind=False, detail="",
                                              seconds=self.clock.monotonic() - self._risk_waiting_since))
        by_engine = self._equity_by_engine()
        change = self._monitor().engine_change(by_engine)
        if change is not None:
            before, now = change
            detail = (f"engines were {', '.join(before) or 'none'}, now {', '.join(now) or 'none'}: the "
                      f"breaker's baselines start again from equity {self._equity}")
            log.warning("breaker re-based: the engines changed", before=list(before), now=list(now),
                        equity=str(self._equity))
            self.bus.publish(RiskRebased(ts=self.clock.now(), reason=detail, equity=self._equity))
        await self._apply_transitions(self._monitor().update(self.clock.now(), by_engine))
        if change is not None:
            await self._persist_risk()

    async def _await_prices(self) -> None:
        """At start-up, give the market feed a bounded moment to price every held position."""
        deadline = self.clock.monotonic() + min(30.0, self.settings.startup_stage_timeout_seconds / 2)
        while True:
            missing = sorted({p.symbol for name in self.parts for p in await self._ledger().positions(name)
                              if self.feeds[name].ticker(p.symbol) is None})
            if not missing or self.clock.monotonic() >= deadline:
                break
            await self.clock.sleep(0.1)
        if missing:
            log.warning("no price yet for held positions; the breaker waits for them", symbols=missing)

    def _equity_by_engine(self) -> dict[str, Decimal]:
        return {name: book.equity for name, book in self.books.items()}

    async def _apply_transitions(self, transitions: list[Transition]) -> None:
        for t in transitions:
            log.warning("trading state changed", old=str(t.old), new=str(t.new), reason=t.reason,
                        until=t.until)
            self.bus.publish(TradingStateChanged(ts=self.clock.now(), old=t.old, new=t.new,
                                                 reason=t.reason, until=t.until))
            self._risk_dirty = True
        # Persist first: a crash in the middle of flattening must not forget a trip or a kill.
        if transitions:
            await self._persist_risk()
        flatten = [t for t in transitions if t.flatten]
        if flatten:
            self._request_flatten(system=flatten[-1].new is TradingState.HALTED, reason=flatten[-1].reason)

    async def _persist_risk(self) -> None:
        await self._ledger().set_state(RISK_KEY, self._monitor().state.to_dict())
        self._risk_dirty = False

    async def _persist_progress(self) -> None:
        await self._persist_risk()
        if isinstance(self.feed, ReplayFeed):
            await self._ledger().set_state(self._cursor_key(), {"cursor": self.feed.cursor})

    async def flatten_all(self, *, system: bool, reason: str) -> int:
        """Close every position with market orders through the gate. `system` marks the kill switch's
        own flattening, the one thing that passes while HALTED. A symbol with no price yet is left as it
        is — its protective stop too — for the next pass, rather than cancelling the stop and failing
        to sell. So is one whose cancel or sale the exchange did not answer or refused: the error is
        logged and the next pass tries again (`_flatten_until_flat`); it never ends the flattening.
        Returns how many positions are still open, with the orders whose outcome is not known yet;
        what they are and why they stay is in `_flatten_pass`."""
        self._flatten_pass = FlattenPass()
        remaining = 0
        for name, part in self.parts.items():
            async with part.trade_lock:
                resting = await self._ledger().orders_in_states(
                    [OrderState.OPEN, OrderState.PARTIALLY_FILLED], engine=name
                )
                positions = await self._ledger().positions(name)
                for position in positions:
                    if self.feeds[name].ticker(position.symbol) is None:
                        log.error("flatten postponed: no price yet", engine=name, symbol=position.symbol)
                        self._flatten_pass.why[name, position.symbol] = "no price yet"
                        continue
                    try:
                        await self._flatten_one(part, position, resting, system=system, reason=reason)
                    except _EXCHANGE_TROUBLE as exc:
                        log.error("flatten step failed; the next pass tries again", engine=name,
                                  symbol=position.symbol, error=repr(exc))
                        self._flatten_pass.why[name, position.symbol] = f"step failed: {exc!r}"
                # Entry orders still resting (limit entries) go too; protective stops of positions that
                # could not be closed stay.
                for order in resting:
                    if not order.reduce_only and not order.state.is_terminal:
                        await self._cancel_quietly(part, order)
                if part.context is not None:
                    await self._refresh_engine_positions(name)
                remaining += await self._left_to_flatten(part)
        return remaining

    async def _left_to_flatten(self, part: EngineParts) -> int:
        """What the ledger says is still open after a pass, not what the pass meant to close: an entry
        cancel that turned out filled adds a position, and an order sent without a clear answer (an
        outage just before the kill) may still open, close or protect one, so it counts until it
        settles. A remainder too small to sell does not count: no pass could close it. Each one left is
        noted in `_flatten_pass` with the reason the pass gave for it."""
        name = part.name
        done = self._flatten_pass
        left = 0
        for position in await self._ledger().positions(name):
            key = (name, position.symbol)
            try:
                step = part.exchange.market(position.symbol).amount_step
            except _EXCHANGE_TROUBLE as exc:
                left += 1  # no market to size it by: still open, as far as anyone can tell
                done.left[key] = done.why.get(key, f"no market to size it by: {exc!r}")
                continue
            if quantize_down(position.amount, step) > 0:
                left += 1
                done.left[key] = done.why.get(key, "still open after the pass")
        doubtful = await self._ledger().orders_in_states([OrderState.PENDING, OrderState.UNKNOWN], engine=name)
        if doubtful:
            log.warning("flattening waits on orders whose outcome is not known yet", engine=name,
                        client_order_ids=[o.client_order_id for o in doubtful])
            for o in doubtful:  # an entry in doubt may hold no position (yet)
                done.left.setdefault((name, o.symbol), f"no outcome known for order {o.client_order_id}")
        done.positions += left
        done.orders += len(doubtful)
        return left + len(doubtful)

    async def _flatten_one(self, part: EngineParts, position: Position, resting: list[Order], *,
                           system: bool, reason: str) -> None:
        """Cancel the position's resting orders, then sell what is still held at market. What is left
        afterwards is counted from the ledger (`_left_to_flatten`)."""
        name = part.name
        # Resting orders on this symbol first: a protective stop would sell the same coins.
        for order in [o for o in resting if o.symbol == position.symbol]:
            settled = await part.orders.cancel(order)
            if not settled.order.state.is_terminal:
                log.error("flatten waits: an order on the symbol is still working", engine=name,
                          symbol=position.symbol, client_order_id=order.client_order_id,
                          state=str(settled.order.state))
                self._flatten_pass.why[name, position.symbol] = (
                    f"an order on the symbol is still working ({order.client_order_id}, {settled.order.state})")
                return
        # An order of the symbol whose outcome is not known (an exit sale or a stop sent during an outage)
        # may have sold already: selling again could sell coins the position no longer has. The order
        # poll asks about it; the next pass goes on once it is settled.
        doubtful = [o for o in await self._ledger().orders_in_states([OrderState.PENDING, OrderState.UNKNOWN],
                                                                      engine=name) if o.symbol == position.symbol]
        if doubtful:
            log.warning("flatten waits: an order of the symbol has no known outcome yet", engine=name,
                        symbol=position.symbol, client_order_ids=[o.client_order_id for o in doubtful])
            self._flatten_pass.why[name, position.symbol] = (
                f"no outcome known for order {', '.join(o.client_order_id for o in doubtful)}")
            return
        # Read again: a stop that fired before its cancel (a kill in a falling market) has sold some or
        # all of it, and selling the amount read before would sell coins the position no longer has.
        current = await self._ledger().position(name, position.symbol)
        if current is None or current.side is not position.side:
            return
        market = part.exchange.market(position.symbol)
        amount = quantize_down(current.amount, market.amount_step)
        if amount <= 0:
            return
        intent = OrderIntent(
            engine=name, market=current.market, symbol=current.symbol,
            side=current.side.exit_side, amount=amount, order_type=OrderType.MARKET,
            reduce_only=True, system_flatten=system, reason=f"flatten: {reason}",
        )
        decision = self._gate().check(intent, equity=self._equity, open_positions=0, has_position=True)
        if not decision.allowed:
            log.error("flatten denied", engine=name, symbol=position.symbol, reason=decision.reason)
            self._flatten_pass.why[name, position.symbol] = f"denied: {decision.reason}"
            return
        result = await part.orders.submit(intent)
        log.warning("flattened", engine=name, symbol=position.symbol, filled=str(result.filled),
                    error=result.error)
        sale = result.order
        if sale.state in (OrderState.PENDING, OrderState.UNKNOWN):  # not a refusal: nobody knows yet
            self._flatten_pass.why[name, position.symbol] = f"no outcome known for order {sale.client_order_id}"
        elif result.error is not None:
            self._flatten_pass.why[name, position.symbol] = f"the exchange refused: {result.error}"

    @staticmethod
    async def _cancel_quietly(part: EngineParts, order: Order) -> bool:
        """Cancel one order; an exchange that does not answer or refuses is logged, not raised, so one
        order never keeps the others from being cancelled. True when the cancel went through."""
        try:
            await part.orders.cancel(order)
        except _EXCHANGE_TROUBLE as exc:
            log.error("order not cancelled", engine=part.name, client_order_id=order.client_order_id,
                      symbol=order.symbol, error=repr(exc))
            return False
        return True

    def _request_flatten(self, *, system: bool, reason: str) -> asyncio.Task[Any]:
        """Flatten in its own task, so the supervisor tick (and the watchdog ping) never waits on it."""
        self._flatten_wanted = (system, reason)
        if self._flatten_task is None or self._flatten_task.done():
            self._flatten_task = self._own(self._flatten_until_flat(), "flatten")
        return self._flatten_task

    async def _flatten_until_flat(self) -> None:
        """Pass after pass until nothing is left (or trading is ACTIVE again). The request is kept in the
        ledger until then, so a crash or a stop in the middle does not leave the rest open: the next start
        takes it up again (`_resume_flatten`). One that lasts is told to the owner (`_tell_if_stuck`),
        and so is its end after that."""
        interval = self.settings.health_check_interval_seconds
        saved: tuple[bool, str] | None = None
        started = self.clock.monotonic()
        alerted_at: float | None = None
        while True:
            system, reason = self._flatten_wanted
            if saved != (system, reason):
                await self._ledger().set_state(FLATTEN_KEY, {"pending": True, "system": system, "reason": reason})
                saved = (system, reason)
            remaining = await self.flatten_all(system=system, reason=reason)
            if remaining == 0 or self.trading_state is TradingState.ACTIVE:
                await self._ledger().set_state(FLATTEN_KEY, {"pending": False, "system": system, "reason": reason})
                if alerted_at is not None:
                    self._publish_flatten_stuck(stuck=False, seconds=self.clock.monotonic() - started)
                return
            log.warning("positions still open after flatten; trying again", remaining=remaining)
            alerted_at = self._tell_if_stuck(started, alerted_at)
            await self.clock.sleep(interval)

    def _tell_if_stuck(self, started: float, alerted_at: float | None) -> float | None:
        """After FLATTEN_STUCK_ALERT_SECONDS with positions left, tell the owner what is left and why,
        and again every FLATTEN_STUCK_REPEAT_SECONDS while it lasts: the log alone says it every pass,
        where nobody reads it, and some leftovers wait for a person. Returns when it last told."""
        now = self.clock.monotonic()
        due = (now - started >= FLATTEN_STUCK_ALERT_SECONDS if alerted_at is None
               else now - alerted_at >= FLATTEN_STUCK_REPEAT_SECONDS)
        if not due:
            return alerted_at
        done = self._flatten_pass
        log.error("flattening stuck: the owner is told", seconds=round(now - started), positions=done.positions,
                  orders=done.orders, left=[f"{e} {s}: {why}" for (e, s), why in sorted(done.left.items())])
        self._publish_flatten_stuck(stuck=True, seconds=now - started)
        return now

    def _publish_flatten_stuck(self, *, stuck: bool, seconds: float) -> None:
        """One event for both the alert and its end (`stuck`), as BreakerBlind: one kind to subscribe to,
        and the end carries what was left too (something, when trading was resumed first)."""
        done = self._flatten_pass
        left = tuple((engine, symbol, why) for (engine, symbol), why in sorted(done.left.items()))
        self.bus.publish(FlattenStuck(ts=self.clock.now(), stuck=stuck, seconds=seconds, positions=done.positions,
                                      orders=done.orders, left=left))

    async def _resume_flatten(self) -> None:
        """At start-up: a flattening the previous run did not finish goes on. HALTED always flattens
        (the kill switch closes everything, and its state is saved before the flattening starts, so a
        crash between the two must not skip it); REDUCING does when its trip asked for it."""
        state = self.trading_state
        if state is TradingState.ACTIVE:
            return
        saved = await self._ledger().get_state(FLATTEN_KEY) or {}
        if state is TradingState.HALTED:
            system, reason = True, str(saved.get("reason") or self._monitor().state.reason or "kill")
        elif saved.get("pending"):
            system, reason = bool(saved.get("system")), str(saved.get("reason") or "")
        else:
            return
        held = len(await self._ledger().positions())
        if held == 0 and not saved.get("pending"):
            return
        log.warning("flattening resumed after a restart", trading_state=str(state), positions=held,
                    reason=reason)
        self._request_flatten(system=system, reason=reason)

    async def _refresh_engine_positions(self, name: str) -> None:
        sup = self.supervisor
        slot = sup.slots.get(name) if sup is not None else None
        if slot is not None and slot.engine is not None:
            await slot.engine.refresh_positions()

    async def _cancel_entries_at_stop(self) -> None:
        canceled = await self.cancel_entry_orders()
        if canceled:
            log.info("pending entry orders canceled", count=canceled)

    async def cancel_entry_orders(self) -> int:
        canceled = 0
        for name, part in self.parts.items():
            open_orders = await self._ledger().orders_in_states(
                [OrderState.OPEN, OrderState.PARTIALLY_FILLED], engine=name
            )
            for order in open_orders:
                if order.reduce_only:
                    continue
                canceled += await self._cancel_quietly(part, order)
        return canceled

    async def _journal_writer(self, sub: Subscription) -> None:
        """Append every event to the ledger's journal, in batches so a burst costs one transaction."""
        ledger = self._ledger()
        while True:
            first = await sub.get()
            batch: list[Event] = [first]
            while not sub.queue.empty() and len(batch) < 500:
                batch.append(sub.queue.get_nowait())
            await ledger.journal_many([(e.kind, e.as_dict(), e.ts) for e in batch])

    async def _flush_journal(self) -> None:
        sub = self._journal_sub
        if sub is None or self.ledger is None:
            return
        batch: list[Event] = []
        while not sub.queue.empty():
            batch.append(sub.queue.get_nowait())
        if batch:
            await self.ledger.journal_many([(e.kind, e.as_dict(), e.ts) for e in batch])

    # --- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        log.info("shutting down", reason=self._stop_reason or "start-up failed")
        self.bus.publish(DaemonStopping(ts=self.clock.now(), reason=self._stop_reason))
        self.ops.stopping()
        if self.supervisor is not None:
            await self.supervisor.stop_all()
        for part in self.parts.values():
            if not await part.orders.drain(self.settings.exchange_timeout_seconds):
                log.error("an order send was still in flight at shutdown", engine=part.name)
        for task in list(self._tasks):
            if task.get_name() == "supervisor":
                task.cancel()
        if self.ledger is not None and self.parts and self.gate is not None:
            # Each step on its own: one that fails (an exchange that does not answer a cancel) must not
            # cost the others, least of all the final portfolio.
            await _quietly(self._cancel_entries_at_stop(), "cancel entry orders")
            await _quietly(self._refresh_books(), "final books")
            await _quietly(self._persist_progress(), "save progress")
            try:
                self._report_portfolio(final=True)
            except Exception as exc:
                log.error("final portfolio report failed", error=repr(exc), exc_info=exc)
        try:
            await self.clock.wait_for(self.ops.stop(), 15.0)
        except TimeoutError:
            log.error("operations (telegram, health endpoint) did not stop within 15s")
        for task in list(self._tasks):
            if task.get_name() != "journal":
                task.cancel()
        await asyncio.gather(*[t for t in self._tasks if t.get_name() != "journal"], return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Flattening and Telegram may have sent orders after the drain above; their recording must
        # finish before the exchange and the ledger close under it.
        for part in self.parts.values():
            if not await part.orders.drain(self.settings.exchange_timeout_seconds):
                log.error("an order send was still in flight at shutdown", engine=part.name)
        try:
            await self._flush_journal()
            for feed in {id(f): f for f in self.feeds.values()}.values():
                await _quietly(feed.stop(), "feed stop")
            for part in self.parts.values():
                await _quietly(part.exchange.close(), "exchange close")
            orphans = [t for t in self._engine_tasks if not t.done()]
            if orphans:
                log.error("engine tasks still running at exit", tasks=[t.get_name() for t in orphans])
        finally:
            # Whatever went wrong above, the ledger is closed (its queued writes committed, the WAL
            # checkpointed) and the DATA_DIR lock released.
            if self.ledger is not None:
                if not self._crashed:
                    self._ledger_refused_a_sent_order()  # refused during the stop: still a crash
                await self.ledger.close()
            if self._lock_file is not None:
                self._lock_file.close()
        log.info("stopped")

    def _log_engine_status(self) -> None:
        for name, slot in self._supervisor().slots.items():
            engine = slot.engine
            detail = engine.get_status() if engine is not None else {}
            log.info("engine status", engine=name, state=slot.state.value, heartbeat_age=self.health.age(name),
                     restarts=self.policy.restarts(name), paused=self._gate().is_paused(name),
                     **{k: v for k, v in detail.items() if k in ("positions", "steps", "entries", "exits",
                                                                  "denied", "rejected", "stale_symbols")})

    def _report_portfolio(self, *, final: bool) -> None:
        realized = sum((b.realized for b in self.books.values()), ZERO)
        unrealized = sum((b.unrealized for b in self.books.values()), ZERO)
        engines: dict[str, dict[str, Any]] = {}
        for name, book in self.books.items():
            engines[name] = {
                "equity": str(book.equity.quantize(Decimal("0.01"))),
                "realized_pnl": str(book.realized.quantize(Decimal("0.0001"))),
                "unrealized_pnl": str(book.unrealized.quantize(Decimal("0.0001"))),
                "positions": [
                    {"symbol": p.symbol, "side": str(p.side), "amount": str(p.amount),
                     "entry": str(p.entry_price)} for p in book.positions
                ],
            }
        log.info("final portfolio" if final else "portfolio", equity=str(self._equity.quantize(Decimal("0.01"))),
                 realized_pnl=str(realized.quantize(Decimal("0.0001"))),
                 unrealized_pnl=str(unrealized.quantize(Decimal("0.0001"))),
                 trading_state=str(self.trading_state), engines=engines)
        self.bus.publish(PortfolioReported(ts=self.clock.now(), equity=self._equity, realized_pnl=realized,
                                           unrealized_pnl=unrealized, engines=engines, final=final))

    # --- accessors -------------------------------------------------------------------------------
    @property
    def trading_state(self) -> TradingState:
        return self.monitor.trading_state if self.monitor is not None else TradingState.ACTIVE

    def _ledger(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("ledger not open")
        return self.ledger

    def _feed(self) -> MarketFeed:
        if self.feed is None:
            raise RuntimeError("feed not started")
        return self.feed

    def _gate(self) -> RiskGate:
        if self.gate is None:
            raise RuntimeError("risk gate not built")
        return self.gate

    def _allocator(self) -> CapitalAllocator:
        if self.allocator is None:
            raise RuntimeError("allocator not built")
        return self.allocator

    def _monitor(self) -> GlobalRiskMonitor:
        if self.monitor is None:
            raise RuntimeError("risk monitor not built")
        return self.monitor

    def _supervisor(self) -> Supervisor:
        if self.supervisor is None:
            raise RuntimeError("supervisor not built")
        return self.supervisor

    # --- Control protocol (Telegram, health endpoint) --------------------------------------------
    async def status(self) -> StatusReport:
        mon = self._monitor()
        engines: list[EngineStatus] = []
        for name in ("spot", "futures"):
            if name not in self.parts:
                continue
            slot = self._supervisor().slots.get(name)
            book = self.books.get(name, EngineBook())
            paused = self._gate().is_paused(name)
            state = slot.state.value if slot is not None else "stopped"
            if state == SlotState.RUNNING.value and paused:
                state = "paused"
            engines.append(EngineStatus(
                name=name, state=state, heartbeat_age=self.health.age(name), paused=paused,
                restarts=self.policy.restarts(name), equity=book.equity,
                open_positions=len(book.positions), realized_pnl=book.realized,
                unrealized_pnl=book.unrealized,
            ))
        return StatusReport(
            mode=self.mode, trading_state=mon.trading_state, engines=tuple(engines), equity=self._equity,
            day_pnl=mon.daily_pnl(self._equity), day_pnl_pct=mon.daily_pnl_pct(self._equity),
            drawdown_pct=mon.drawdown_pct(self._equity),
            uptime_seconds=self.clock.monotonic() - self._started_at,
            breaker_blind=self.breaker_blind(),
        )

    async def positions(self) -> list[Position]:
        return await self._ledger().positions()

    async def balance(self) -> list[BalanceReport]:
        out = []
        for name, part in self.parts.items():
            b = await part.exchange.fetch_balance()
            out.append(BalanceReport(engine=name, free=dict(b.free), total=dict(b.total), equity=b.equity))
        return out

    async def pnl(self, days: int) -> list[DailyPnl]:
        rows = await self._ledger().realized_pnl_by_day(days, self.clock.now())
        return [DailyPnl(day=d, engine=e, realized_pnl=p, trades=n) for d, e, p, n in rows]

    async def trades(self, n: int) -> list[TradeRecord]:
        rows = await self._ledger().closed_trades(limit=n)
        return [TradeRecord(ts=t.closed_at, engine=t.engine, symbol=t.symbol, side=str(t.side),
                            amount=t.amount, price=t.exit_price, fee=t.fees, realized_pnl=t.realized_pnl)
                for t in rows]

    def _targets(self, target: str) -> list[str] | None:
        if target not in ENGINE_TARGETS:
            return None
        return list(self.parts) if target == "all" else [target] if target in self.parts else []

    async def _save_pauses(self) -> None:
        gate = self._gate()
        await self._ledger().set_state(PAUSE_KEY, {n: gate.is_paused(n) for n in self.parts})

    async def pause(self, target: str, by: str) -> CommandResult:
        names = self._targets(target)
        if names is None:
            return CommandResult(False, f"unknown engine {target!r}; use spot, futures or all")
        if not names:
            return CommandResult(False, f"engine {target} is not enabled")
        for name in names:
            self._gate().set_paused(name, True)
            self.bus.publish(EnginePaused(ts=self.clock.now(), engine=name, paused=True, by=by))
        await self._save_pauses()
        log.warning("paused", engines=names, by=by)
        return CommandResult(True, f"paused {', '.join(names)}: no new entries; exits still managed")

    async def resume(self, target: str, by: str) -> CommandResult:
        names = self._targets(target)
        if names is None:
            return CommandResult(False, f"unknown engine {target!r}; use spot, futures or all")
        mon = self._monitor()
        notes = []
        if mon.trading_state is TradingState.HALTED:
            if target != "all":
                return CommandResult(False, "trading is HALTED (killed); only /resume all lifts it")
            refused = self._rebase_refused("resume")
            if refused is not None:
                return refused
            t = mon.resume(self.clock.now(), self._equity)
            if t is not None:
                await self._apply_transitions([t])
                notes.append("trading ACTIVE again")
        for name in names:
            self._gate().set_paused(name, False)
            self.bus.publish(EnginePaused(ts=self.clock.now(), engine=name, paused=False, by=by))
        await self._save_pauses()
        log.warning("resumed", engines=names, by=by)
        return CommandResult(True, "; ".join([f"resumed {', '.join(names) or 'nothing'}", *notes]))

    async def restart(self, engine: str, by: str) -> CommandResult:
        sup = self._supervisor()
        slot = sup.slots.get(engine)
        if slot is None:
            return CommandResult(False, f"engine {engine!r} is not running here")
        if slot.state is SlotState.FAILED:
            self.policy.reset(engine)
            slot.state = SlotState.RESTARTING
            slot.restart_at = self.clock.monotonic()
            sup.wake.set()
            return CommandResult(True, f"{engine} was FAILED; starting it again")
        await sup.restart_now(engine, f"requested by {by}")
        return CommandResult(True, f"{engine} restarting")

    async def breaker(self) -> BreakerReport:
        st = self._monitor().state
        return BreakerReport(state=st.trading_state, reason=st.reason, until=st.until,
                             day_start_equity=st.day_start_equity, peak_equity=st.peak_equity)

    async def breaker_reset(self, by: str) -> CommandResult:
        if self._monitor().trading_state is not TradingState.REDUCING:
            return CommandResult(False, f"breaker not tripped (state {self.trading_state})")
        refused = self._rebase_refused("reset the breaker")
        if refused is not None:
            return refused
        t = self._monitor().reset_breaker(self.clock.now(), self._equity)
        if t is None:
            return CommandResult(False, f"breaker not tripped (state {self.trading_state})")
        await self._apply_transitions([t])
        log.warning("breaker reset", by=by)
        return CommandResult(True, "breaker reset: trading ACTIVE")

    def _rebase_refused(self, what: str) -> CommandResult | None:
        """A resume or a breaker reset re-bases the breaker on today's equity, so it needs the whole of
        it: on one engine's book alone (the other's balance not read yet) or without a price for a held
        position, the new baseline would be too low and the limits would trip far too late, or never."""
        if self._books_complete and self._equity > 0:
            return None
        if self._books_complete:
            return CommandResult(False, f"cannot {what}: the account's equity is {self._equity}, and the limits "
                                        f"need a positive base; fund the account first")
        return CommandResult(False, f"cannot {what} yet: the books are incomplete ({self._missing_books()}) "
                                    f"and the breaker would re-base on a wrong equity; try again in a minute")

    def breaker_blind(self) -> str | None:
        """What keeps the breaker from judging, once that has lasted long enough to alert; None while it
        sees the whole account. /healthz is unhealthy meanwhile."""
        return self._missing_books() if self._risk_blind_alerted else None

    def _missing_books(self) -> str:
        """What keeps the books incomplete, for the owner."""
        parts = []
        missing = sorted(self._balance_failing | (set(self.parts) - set(self.books)))
        if missing:
            parts.append(f"no balance from {', '.join(missing)}")
        if self._unpriced:
            parts.append(f"no price for {', '.join(sorted(self._unpriced))}")
        return "; ".join(parts) or "no balance read yet"

    async def kill(self, by: str) -> CommandResult:
        t = self._monitor().kill(self.clock.now(), f"kill by {by}")
        log.error("KILL SWITCH", by=by)
        await self._apply_transitions([t])  # persisted at once; the kill transition always flattens
        task = self._flatten_task
        if task is not None:
            # Shielded: a caller that gives up waiting (Telegram's timeout) never stops the flattening.
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(asyncio.shield(task), 15.0)
        remaining = len(await self._ledger().positions())
        state = "flattened" if remaining == 0 else f"{remaining} positions still closing"
        return CommandResult(True, f"HALTED: orders canceled, positions {state}; /resume all to trade again")


async def _quietly(step: Awaitable[object], what: str) -> None:
    """One shutdown step whose failure must not keep the later ones (closing the ledger) from running."""
    try:
        await step
    except Exception as exc:
        log.error("shutdown step failed; going on", step=what, error=repr(exc))
