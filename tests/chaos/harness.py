"""The chaos harness: SIGKILL the daemon at seeded random moments of its order flow, restart it on the
same ledger, and check what the exchange really did against what the ledger says.

Each *lane* is one fake exchange process (`tests.chaos.fake_market`, which outlives every daemon
restart: its record is the truth) and one daemon (`python main.py`, TRADING_MODE=testnet pointed at
the fake) on its own DATA_DIR. The harness moves the lane's prices along the bundled Binance candles,
so the loosened momentum strategy trades every second or so, and lands each kill in one phase:

- `before_send`: the order row is in the ledger and the send has begun, but nothing has reached the
  exchange. A market order's send first reads the symbol's ticker (the only one-symbol ticker read the
  daemon makes); the fake parks that read and the daemon is killed while it waits.
- `during_send`: a delay fault on POST order holds the answer (`process=True`: the order is placed,
  the answer never arrives) or the request itself (`process=False`: it dies with the connection); the
  kill lands while the request is in flight.
- `after_fill`: the fake records a new execution (an entry, an exit, a protective stop firing); the
  kill follows within a few tens of milliseconds, somewhere between the fill and the ledger, or
  between an entry and its protective stop.
- `reconciliation`: a fresh start is killed while its reconciliation stage runs (the fake answers its
  reads a little slowly, so the kill lands inside); a kill that came too late counts as a miss.

Lanes run side by side: a kill that leaves an order the exchange never saw makes the next start wait
out the order manager's grace period (30 s) before it settles the order, and the other lanes keep
killing meanwhile. After its last kill a lane starts its daemon once more with the market frozen, lets
reconciliation finish, stops it with SIGTERM (exit 0 expected) and checks `check_lane`.

`run_scenarios` uses the same lanes for the fault matrix (one fault of the fake per lane, sent through
the running daemon, which must keep trading and settle the faulted order as designed) and for
scenarios that pin down one finding each deterministically (a kill while the protective stop's answer
is in flight; a round trip with the fee taken in the coins bought).

Every wait is bounded; the harness reads the real clock only through `core.clock.LiveClock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import functools
import gzip
import json
import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import aiohttp

from config import Settings
from core.clock import Clock, LiveClock
from tests.fakes.binance import API_KEY, API_SECRET, SYMBOLS, exchange_symbol

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
PHASES = ("before_send", "during_send", "after_fill", "reconciliation")
STOP_TYPES = ("STOP_LOSS", "STOP_LOSS_LIMIT")
OPEN = ("NEW", "PARTIALLY_FILLED")
LOG_LINE_LIMIT = 4 * 1024 * 1024
# What ends a lane early, recorded as its problem: a daemon that never came up or keeps exiting
# (RuntimeError), the fake not answering (aiohttp), a process that would not go (TimeoutError).
HARNESS_TROUBLE = (TimeoutError, RuntimeError, aiohttp.ClientError, OSError)
# Longer than the daemon's open-order poll (every max(2 s, SPOT_MONITOR_INTERVAL_SECONDS)).
FINAL_POLL_SECONDS = 3.0
FAILED_ENGINE_EVENTS = ("engine failed: too many restarts", "engine crashed", "service task died")

# The daemon's settings for a chaos run: the strategy loosened until two rising candles are an entry,
# exits 0.3 % away, data polled several times a second. DATA_DIR and the fake's URL are per lane.
DAEMON_ENV = {
    "TRADING_MODE": "testnet",
    "BINANCE_API_KEY": API_KEY,
    "BINANCE_API_SECRET": API_SECRET,
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "LOOPLAG_ENABLED": "false",
    "HEALTH_CHECK_INTERVAL_SECONDS": "0.2",
    "EXCHANGE_TIMEOUT_SECONDS": "5",
    "SPOT_SYMBOLS": "BTC/USDT,ETH/USDT,SOL/USDT",
    "SPOT_TIMEFRAME": "1m",
    "SPOT_EMA_FAST": "2",
    "SPOT_EMA_SLOW": "3",
    "SPOT_MIN_MOMENTUM_PCT": "0",
    "SPOT_RSI_MIN": "0",
    "SPOT_RSI_MAX": "100",
    "SPOT_VOLUME_FACTOR": "0",
    "SPOT_SCAN_INTERVAL_SECONDS": "0.5",
    "SPOT_MONITOR_INTERVAL_SECONDS": "0.25",
    "SPOT_STOP_LOSS_PCT": "0.3",
    "SPOT_TAKE_PROFIT_PCT": "0.3",
    "SPOT_MAX_POSITIONS": "3",
    "SPOT_POSITION_SIZE_PCT": "20",
    "FUTURES_ENABLED": "false",
}


@dataclass(frozen=True)
class LaneConfig:
    """What every lane shares: the market and the daemon's environment."""

    price_step_seconds: float = 0.25
    warm_candles: int = 120
    # "BNB": fees paid in BNB, so a position is exactly what was bought (see fake_market); "base":
    # Binance's default, the buy's fee taken out of the coins bought.
    fee_asset: str = "BNB"
    start_timeout: float = 75.0
    env: tuple[tuple[str, str], ...] = ()

    def daemon_env(self) -> dict[str, str]:
        return {**DAEMON_ENV, **dict(self.env)}

    def symbols(self) -> list[str]:
        return [s.strip() for s in self.daemon_env()["SPOT_SYMBOLS"].split(",") if s.strip()]


@dataclass(frozen=True)
class ChaosConfig:
    """A kill schedule (seeded: phases, their order, price paths and kill delays) and its pacing."""

    kills: int = 50
    seed: int = 1
    lanes: int = 6
    # Relative share of each phase in the kill schedule; every phase gets at least `min_per_phase`.
    weights: tuple[tuple[str, float], ...] = (
        ("before_send", 0.6), ("during_send", 2.0), ("after_fill", 2.0), ("reconciliation", 1.5))
    min_per_phase: int = 3
    # Share of during-send kills whose order the exchange carries out before the answer is held.
    placed_share: float = 0.8
    trigger_timeout: float = 12.0
    # After the final start: how long the daemon trades on the frozen market before SIGTERM.
    final_settle_seconds: float = 1.5
    lane: LaneConfig = field(default_factory=LaneConfig)


@dataclass
class Kill:
    """One SIGKILL: the phase it was aimed at, whether it landed there (`hit`), and the daemon run it
    ended (`run`: daemon-NNNN.log in the lane's DATA_DIR)."""

    lane: int
    index: int
    phase: str
    hit: bool
    detail: str
    run: int
    seconds: float = 0.0


@dataclass
class Checks:
    """What the exchange's record and the ledger say after the last clean stop."""

    orders: int = 0
    fills: int = 0
    positions: int = 0
    never_sent: int = 0
    reused_client_ids: list[str] = field(default_factory=list)
    orphan_orders: list[str] = field(default_factory=list)
    lost_fills: list[str] = field(default_factory=list)
    phantom_fills: list[str] = field(default_factory=list)
    fill_mismatches: list[str] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)
    holdings_mismatches: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    state_mismatches: list[str] = field(default_factory=list)
    # Protected on the exchange, but the ledger's position does not name that stop as its own.
    unlinked_stops: list[str] = field(default_factory=list)
    # Positions too small to sell or protect (below the market's minimum): reported, not "unprotected".
    dust_positions: list[str] = field(default_factory=list)

    # What the issue promises (no duplicate, no lost fill, no unprotected position) and the agreement of
    # ledger and exchange it rests on.
    SAFETY = ("reused_client_ids", "orphan_orders", "lost_fills", "phantom_fills", "fill_mismatches",
              "unprotected", "holdings_mismatches", "unsettled", "state_mismatches")
    # The ledger's bookkeeping of positions, which decides what the engine does next.
    CONSISTENCY = ("unlinked_stops", "dust_positions")

    @property
    def duplicates(self) -> int:
        return len(self.reused_client_ids) + len(self.orphan_orders)

    @property
    def lost(self) -> int:
        return len(self.lost_fills) + len(self.fill_mismatches)

    def problems(self, names: Iterable[str] = SAFETY + CONSISTENCY) -> list[str]:
        return [f"{name}: {item}" for name in names for item in getattr(self, name)]


@dataclass
class LaneResult:
    lane: str
    data_dir: Path
    kills: list[Kill] = field(default_factory=list)
    restarts: int = 0
    final_exit_code: int | None = None
    crash_exits: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    error_events: list[str] = field(default_factory=list)
    failed_engines: list[str] = field(default_factory=list)
    # Orders the exchange refused for lack of funds: a daemon that knows what it holds never sends one.
    refused_orders: list[str] = field(default_factory=list)
    # Process start to "daemon started" (imports, reconciliation and all), per start that got there.
    ready_seconds: list[float] = field(default_factory=list)
    # Why the lane stopped before its end (the harness could not go on), if it did.
    aborted: str | None = None
    checks: Checks | None = None

    def problems(self, names: Iterable[str] = Checks.SAFETY) -> list[str]:
        """The safety findings (by default; pass `Checks.CONSISTENCY` too for everything) and whatever
        went wrong with the processes."""
        tag = f"{self.lane} ({self.data_dir})"
        out = [f"{tag}: not checked"] if self.checks is None else [f"{tag}: {p}" for p in self.checks.problems(names)]
        if self.aborted is not None:
            out.append(f"{tag}: aborted: {self.aborted}")
        if self.final_exit_code != 0:
            out.append(f"{tag}: SIGTERM exit code {self.final_exit_code}")
        out.extend(f"{tag}: daemon exited by itself: {c}" for c in self.crash_exits)
        out.extend(f"{tag}: traceback: {t}" for t in self.tracebacks)
        out.extend(f"{tag}: engine failed: {f}" for f in self.failed_engines)
        return out


@dataclass
class ChaosReport:
    config: ChaosConfig
    lanes: list[LaneResult]
    wall_seconds: float

    @property
    def kills(self) -> list[Kill]:
        return [k for lane in self.lanes for k in lane.kills]

    @property
    def restarts(self) -> int:
        return sum(lane.restarts for lane in self.lanes)

    def phase_hits(self) -> Counter[str]:
        return Counter(k.phase for k in self.kills if k.hit)

    def phase_misses(self) -> Counter[str]:
        return Counter(k.phase for k in self.kills if not k.hit)

    def _sum(self, what: Callable[[Checks], int]) -> int:
        return sum(what(lane.checks) for lane in self.lanes if lane.checks is not None)

    @property
    def duplicates(self) -> int:
        return self._sum(lambda c: c.duplicates)

    @property
    def lost_fills(self) -> int:
        return self._sum(lambda c: c.lost)

    @property
    def unprotected(self) -> int:
        return self._sum(lambda c: len(c.unprotected))

    def problems(self) -> list[str]:
        return [p for lane in self.lanes for p in lane.problems()]

    def consistency_findings(self) -> list[str]:
        out = [f"{lane.lane} ({lane.data_dir}): {p}" for lane in self.lanes
               for p in (lane.checks.problems(Checks.CONSISTENCY) if lane.checks is not None else [])]
        for lane in self.lanes:
            if lane.refused_orders:
                runs = sorted({r.split(":")[0] for r in lane.refused_orders}, key=lambda r: int(r.split()[-1]))
                out.append(f"{lane.lane}: {len(lane.refused_orders)} orders refused for lack of funds "
                           f"({', '.join(runs)}; first {lane.refused_orders[0]})")
        return out

    def summary(self) -> dict[str, Any]:
        checks = [lane.checks for lane in self.lanes if lane.checks is not None]
        return {
            "seed": self.config.seed,
            "lanes": len(self.lanes),
            "kills": len(self.kills),
            "restarts": self.restarts,
            "duplicates": self.duplicates,
            "lost_fills": self.lost_fills,
            "unprotected": self.unprotected,
            "phase_hits": dict(sorted(self.phase_hits().items())),
            "phase_misses": dict(sorted(self.phase_misses().items())),
            "orders": sum(c.orders for c in checks),
            "fills": sum(c.fills for c in checks),
            "never_sent_orders": sum(c.never_sent for c in checks),
            "open_positions_at_end": sum(c.positions for c in checks),
            "unlinked_stops": sum(len(c.unlinked_stops) for c in checks),
            "dust_positions": sum(len(c.dust_positions) for c in checks),
            "refused_orders": sum(len(lane.refused_orders) for lane in self.lanes),
            "tracebacks": sum(len(lane.tracebacks) for lane in self.lanes),
            "crash_exits": sum(len(lane.crash_exits) for lane in self.lanes),
            "error_events": sum(len(lane.error_events) for lane in self.lanes),
            "problems": len(self.problems()),
            "wall_seconds": round(self.wall_seconds, 1),
        }


# --- the schedule -----------------------------------------------------------------------------------

def kill_schedule(config: ChaosConfig) -> list[list[tuple[str, str]]]:
    """(phase, variant) for every kill, per lane. Each phase gets at least `min_per_phase` kills, the
    rest in proportion to the weights; `placed_share` of the during-send kills let the exchange carry
    the order out. Kills that cost their lane a grace period (before the send; during a send that never
    lands) are dealt first, so the lanes share them evenly; each lane's list is then shuffled."""
    rng = random.Random(config.seed)
    weights = dict(config.weights)
    counts = dict.fromkeys(PHASES, min(config.min_per_phase, config.kills // len(PHASES)))
    rest = config.kills - sum(counts.values())
    total = sum(weights.values())
    for phase in PHASES:
        counts[phase] += int(rest * weights.get(phase, 0.0) / total)
    short = config.kills - sum(counts.values())
    for phase in rng.choices(PHASES, [weights.get(p, 0.0) for p in PHASES], k=short):
        counts[phase] += 1
    lost = round(counts["during_send"] * (1 - config.placed_share))
    tokens = [("before_send", "")] * counts["before_send"] + [("during_send", "unplaced")] * lost
    tokens += [("during_send", "placed")] * (counts["during_send"] - lost)
    tokens += [("after_fill", "")] * counts["after_fill"] + [("reconciliation", "")] * counts["reconciliation"]
    lanes: list[list[tuple[str, str]]] = [[] for _ in range(max(1, min(config.lanes, config.kills)))]
    for i, token in enumerate(tokens):
        lanes[i % len(lanes)].append(token)
    for lane in lanes:
        rng.shuffle(lane)
    return lanes


# --- the market -------------------------------------------------------------------------------------

def load_closes(symbol: str) -> list[Decimal]:
    """The bundled 5m closes of `symbol` ('BTC/USDT')."""
    base, quote = symbol.split("/")
    path = DATA / f"binance_{base}_{quote}-5m.csv.gz"
    with gzip.open(path, "rt", newline="") as handle:
        return [Decimal(row["close"]) for row in csv.DictReader(handle)]


async def load_all_closes(symbols: Iterable[str]) -> dict[str, list[Decimal]]:
    wanted = list(symbols)
    loaded = await asyncio.gather(*(asyncio.to_thread(load_closes, s) for s in wanted))
    return dict(zip(wanted, loaded, strict=True))


class PricePath:
    """One symbol's walk along real candles, scaled so that it starts at the fake's listed price
    (returns stay those of the history; prices stay where the fake's filters make sense)."""

    def __init__(self, symbol: str, closes: list[Decimal], start: int) -> None:
        spec = SYMBOLS[exchange_symbol(symbol)]
        self.symbol = symbol
        self.tick = Decimal(spec.spot_tick)
        self._closes = closes
        self._scale = Decimal(spec.price) / closes[start]
        self._i = start

    def next(self) -> str:
        price = (self._closes[self._i % len(self._closes)] * self._scale).quantize(self.tick)
        self._i += 1
        return str(price)


# --- processes --------------------------------------------------------------------------------------

class FakeExchange:
    """The fake exchange as a process of its own, and the harness's client for its control endpoints."""

    def __init__(self, clock: Clock, log_path: Path, fee_asset: str) -> None:
        self.clock = clock
        self.log_path = log_path
        self.fee_asset = fee_asset
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = await asyncio.to_thread(self.log_path.open, "w")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.chaos.fake_market", "--port", "0", "--fee-asset", self.fee_asset,
                cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        finally:
            log.close()
        assert self.proc.stdout is not None
        line = await self.clock.wait_for(self.proc.stdout.readline(), 30.0)
        self.url = line.decode().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"fake exchange did not start: {line!r}")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.clock.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def get(self, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def post(self, path: str, body: Any) -> Any:
        assert self.session is not None
        async with self.session.post(self.url + path, json=body) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = await self.get("/_fake/summary")
        return out


class Daemon:
    """One run of `python main.py`: its JSON log read line by line as it is written."""

    def __init__(self, clock: Clock, data_dir: Path, env: dict[str, str], number: int) -> None:
        self.clock = clock
        self.data_dir = data_dir
        self.env = env
        self.number = number
        self.log_path = data_dir / f"daemon-{number:04d}.log"
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.killed = False
        self.started_at = 0.0
        self.ready_at: float | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.started_at = self.clock.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "main.py"), cwd=self.data_dir, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=LOG_LINE_LIMIT,
        )
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "<not json>", "level": "error", "raw": line}
            if isinstance(event, dict):
                self.events.append(event)
            self._changed.set()
        self._changed.set()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.killed

    def seen(self, event: str, **fields: Any) -> bool:
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                   for e in self.events)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True once `predicate()` holds; False on timeout or when the log has ended (process gone)."""
        deadline = self.clock.monotonic() + timeout
        while not predicate():
            left = deadline - self.clock.monotonic()
            if left <= 0 or (self._reader is not None and self._reader.done()):
                return predicate()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(self._changed.wait(), left)
        return True

    async def kill(self) -> None:
        assert self.proc is not None
        self.killed = True
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self._finish(10.0)

    async def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; None if it did not exit in time (then it is killed)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await self._finish(timeout)
        except TimeoutError:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)
            await self._finish(10.0)
            return None
        return self.proc.returncode

    async def reap(self) -> None:
        """Collect a process that exited by itself."""
        await self._finish(10.0)

    async def _finish(self, timeout: float) -> None:
        assert self.proc is not None
        await self.clock.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self.clock.wait_for(self._reader, timeout)
        await asyncio.to_thread(self.log_path.write_text, "\n".join(self.lines) + "\n")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])


def _up_or_gone(daemon: Daemon) -> bool:
    return daemon.seen("daemon started") or not daemon.running


# --- a lane: one fake, one daemon, a moving market --------------------------------------------------

class Lane:
    """The fake exchange process (for the lane's whole life), the daemon runs, the price driver."""

    def __init__(self, name: str, config: LaneConfig, workdir: Path, closes: dict[str, list[Decimal]],
                 rng: random.Random, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.dir = workdir / name
        self.data_dir = self.dir / "data"
        self.paths = [PricePath(s, closes[s], rng.randrange(len(closes[s]) // 2)) for s in config.symbols()]
        self.fake = FakeExchange(clock, self.dir / "fake.log", config.fee_asset)
        self.result = LaneResult(lane=name, data_dir=self.data_dir)
        self.daemon: Daemon | None = None
        self.moving = True
        self._runs = 0
        self._driver: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        await self.fake.start()
        await self.fake.post("/_fake/prices", [
            {"symbol": p.symbol, "price": p.next()} for _ in range(self.config.warm_candles) for p in self.paths])
        self._driver = asyncio.ensure_future(self._drive())

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        if self.daemon is not None and self.daemon.running:
            await self.kill()
        await self.fake.stop()

    async def _drive(self) -> None:
        """Runs for the lane's life (cancelled by `close`). A price step the fake did not take (it was
        busy past the client's timeout) is simply the next step's to make."""
        while True:
            if self.moving:
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    await self.fake.post("/_fake/prices",
                                         [{"symbol": p.symbol, "price": p.next()} for p in self.paths])
            await self.clock.sleep(self.config.price_step_seconds)

    def daemon_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
        base.pop("NOTIFY_SOCKET", None)
        return {**base, **self.config.daemon_env(), "PYTHONPATH": str(ROOT),
                "EXCHANGE_URL_OVERRIDE": self.fake.url, "DATA_DIR": str(self.data_dir)}

    async def launch(self) -> Daemon:
        self._runs += 1
        if self._runs > 1:
            self.result.restarts += 1
        daemon = Daemon(self.clock, self.data_dir, self.daemon_env(), self._runs)
        await daemon.start()
        self.daemon = daemon
        return daemon

    async def ensure_up(self) -> Daemon:
        """A running daemon past start-up. One that exits by itself is a crash: noted, started again."""
        for _ in range(3):
            daemon = self.daemon
            if daemon is None or not daemon.running:
                daemon = await self.launch()
            await daemon.wait_for(functools.partial(_up_or_gone, daemon), self.config.start_timeout)
            if daemon.seen("daemon started") and daemon.running:
                if daemon.ready_at is None:
                    daemon.ready_at = self.clock.monotonic()
                    self.result.ready_seconds.append(daemon.ready_at - daemon.started_at)
                return daemon
            if daemon.proc is not None and daemon.proc.returncode is None:
                raise RuntimeError(f"{self.result.lane}: daemon not up in {self.config.start_timeout:g}s:\n"
                                   f"{daemon.tail()}")
            await daemon.reap()
            self.note_run(daemon)
        raise RuntimeError(f"{self.result.lane}: crash loop, the daemon keeps exiting:\n"
                           f"{self.daemon.tail() if self.daemon else ''}")

    async def kill(self) -> None:
        assert self.daemon is not None
        await self.daemon.kill()
        self.note_run(self.daemon)

    async def stop_cleanly(self, settle: float) -> None:
        """Let the daemon trade `settle` seconds more, then SIGTERM: exit 0 expected."""
        daemon = await self.ensure_up()
        await daemon.wait_for(lambda: False, settle)
        self.result.final_exit_code = await daemon.terminate(60.0)
        self.note_run(daemon)

    async def check(self) -> Checks:
        state = await self.fake.get("/_fake/state")
        checks = await asyncio.to_thread(check_lane, state, self.data_dir / "ledger.sqlite3")
        self.result.checks = checks
        return checks

    def note_run(self, daemon: Daemon) -> None:
        """Findings of one finished run: tracebacks, failed engines, errors, an exit nobody asked for."""
        for e in daemon.events:
            where = f"run {daemon.number}: {e.get('event')}"
            if "exception" in e:
                self.result.tracebacks.append(f"{where}: {str(e['exception']).strip().splitlines()[-1:]}")
            if e.get("level") in ("error", "critical"):
                self.result.error_events.append(f"{where} {e.get('error', '')}".strip())
            if e.get("event") in FAILED_ENGINE_EVENTS:
                self.result.failed_engines.append(where)
            if e.get("event") == "order rejected" and str(e.get("reason", "")).startswith("insufficient funds"):
                self.result.refused_orders.append(f"run {daemon.number}: {e.get('client_order_id')} {e.get('symbol')}")
        if not daemon.killed and daemon.proc is not None and daemon.proc.returncode not in (0, None):
            self.result.crash_exits.append(f"run {daemon.number} exit {daemon.proc.returncode}: {daemon.tail(5)}")


# --- the kills --------------------------------------------------------------------------------------

class ChaosLane(Lane):
    def __init__(self, index: int, config: ChaosConfig, workdir: Path, closes: dict[str, list[Decimal]],
                 phases: list[tuple[str, str]], clock: Clock) -> None:
        super().__init__(f"lane{index}", config.lane, workdir, closes, random.Random(f"{config.seed}-{index}"),
                         clock)
        self.index = index
        self.chaos = config
        self.phases = phases

    async def run(self) -> LaneResult:
        try:
            await self.open()
            await self.kill_all()
        except HARNESS_TROUBLE as exc:
            self.result.aborted = repr(exc)
        finally:
            await self.close()
        return self.result

    async def kill_all(self) -> None:
        for i, (phase, variant) in enumerate(self.phases):
            await self.fake.post("/_fake/clear", {})
            started = self.clock.monotonic()
            kill = await self.kill_once(i, phase, variant)
            kill.seconds = round(self.clock.monotonic() - started, 2)
            self.result.kills.append(kill)
            await self.fake.post("/_fake/clear", {})
        self.moving = False
        await self.stop_cleanly(self.chaos.final_settle_seconds)
        await self.check()

    async def kill_once(self, index: int, phase: str, variant: str) -> Kill:
        if phase == "reconciliation":
            return await self.kill_in_reconciliation(index)
        daemon = await self.ensure_up()
        if phase == "before_send":
            return await self.kill_before_send(index, daemon)
        if phase == "during_send":
            return await self.kill_during_send(index, daemon, placed=variant == "placed")
        return await self.kill_after_fill(index, daemon)

    async def _until(self, daemon: Daemon, ready: Callable[[dict[str, Any]], bool]) -> bool:
        deadline = self.clock.monotonic() + self.chaos.trigger_timeout
        while self.clock.monotonic() < deadline and daemon.running:
            if ready(await self.fake.summary()):
                return True
            await self.clock.sleep(0.005)
        return False

    async def kill_before_send(self, index: int, daemon: Daemon) -> Kill:
        await self.fake.post("/_fake/hold", {"path": "/api/v3/ticker/24hr", "method": "GET",
                                             "when": {"symbol": "*"}, "seconds": 30})
        hit = await self._until(daemon, lambda s: s["held"] > 0)
        await self.kill()
        return Kill(self.index, index, "before_send", hit, "the order's ticker read parked" if hit else "no order",
                    daemon.number)

    async def kill_during_send(self, index: int, daemon: Daemon, *, placed: bool) -> Kill:
        before = (await self.fake.summary())["creates"]
        await self.fake.post("/_fake/faults", {"kind": "delay", "path": "/api/v3/order", "method": "POST",
                                               "seconds": 30, "process": placed})
        hit = await self._until(daemon, lambda s: s["creates"] > before)
        if hit:
            await self.clock.sleep(self.rng.uniform(0, 0.1))
        await self.kill()
        detail = ("placed, answer held" if placed else "request held, never placed") if hit else "no order"
        return Kill(self.index, index, "during_send", hit, detail, daemon.number)

    async def kill_after_fill(self, index: int, daemon: Daemon) -> Kill:
        before = (await self.fake.summary())["trades"]
        hit = await self._until(daemon, lambda s: s["trades"] > before)
        delay = self.rng.uniform(0, 0.06)
        if hit:
            await self.clock.sleep(delay)
        await self.kill()
        return Kill(self.index, index, "after_fill", hit, f"{delay * 1000:.0f} ms after" if hit else "no fill",
                    daemon.number)

    async def kill_in_reconciliation(self, index: int) -> Kill:
        if self.daemon is not None and self.daemon.running:
            await self.kill()  # only before a lane's first kill; not counted as a phase kill
        # A slow exchange during start-up, so the reconciliation lasts long enough to be hit.
        await self.fake.post("/_fake/faults", [
            {"kind": "delay", "path": p, "method": "GET", "seconds": 0.15, "process": True, "count": 3}
            for p in ("/api/v3/openOrders", "/api/v3/myTrades")])
        daemon = await self.launch()
        began = await daemon.wait_for(lambda: daemon.seen("start-up stage", stage="reconciliation")
                                      or not daemon.running, self.config.start_timeout)
        if began and daemon.running:
            await self.clock.sleep(self.rng.uniform(0, 0.4))
        await self.kill()
        hit = daemon.seen("start-up stage", stage="reconciliation") and not daemon.seen(
            "start-up stage done", stage="reconciliation")
        return Kill(self.index, index, "reconciliation", hit, "inside" if hit else "it had finished",
                    daemon.number)


async def run_chaos(config: ChaosConfig, workdir: Path, clock: Clock | None = None) -> ChaosReport:
    """Run the whole kill schedule over `config.lanes` lanes at once and check every lane."""
    clock = clock or LiveClock()
    started = clock.monotonic()
    closes = await load_all_closes(config.lane.symbols())
    lanes = [ChaosLane(i, config, workdir, closes, phases, clock) for i, phases in enumerate(kill_schedule(config))]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(lane.run()) for lane in lanes]
    return ChaosReport(config=config, lanes=[t.result() for t in tasks], wall_seconds=clock.monotonic() - started)


# --- the fault matrix and the scenarios ------------------------------------------------------------

@dataclass
class Outcome:
    """One scenario's result: what it saw (`details`) and what was wrong (`problems`, which include
    the lane's safety findings and process trouble)."""

    name: str
    lane: LaneResult
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def all_problems(self) -> list[str]:
        return self.problems + self.lane.problems(Checks.SAFETY + Checks.CONSISTENCY)


@dataclass(frozen=True)
class FaultCase:
    """One fault of the fake, aimed at the first order of one type, and what must become of that order:
    "placed" (the exchange has it and the ledger agrees), "not_placed" (settled as rejected, nothing
    on the exchange), "partial" (placed, part filled, the ledger has exactly that part).

    `freeze`: stop the market once the fault is hit, so a position opened just before stays open and
    the check sees whether it ends up protected (it is not closed by the next price move)."""

    name: str
    fault: tuple[tuple[str, Any], ...]
    expect: str
    order_type: str = "MARKET"
    freeze: bool = False
    env: tuple[tuple[str, str], ...] = ()


def fault_cases(timeout: float) -> list[FaultCase]:
    def case(name: str, expect: str, order_type: str = "MARKET", freeze: bool = False,
             env: tuple[tuple[str, str], ...] = (), **fault: Any) -> FaultCase:
        spec = {"path": "/api/v3/order", "method": "POST", **fault, "when": {"type": order_type}}
        return FaultCase(name, tuple(sorted(spec.items())), expect, order_type, freeze, env)

    return [
        case("delay_past_timeout", "placed", kind="delay", seconds=timeout + 3, process=True),
        case("drop_after_placing", "placed", kind="drop", process=True),
        case("http_429", "not_placed", kind="http", status=429),
        case("http_418", "not_placed", kind="http", status=418),
        case("http_503", "not_placed", kind="http", status=503),
        case("timestamp_1021", "not_placed", kind="error", status=400, code=-1021,
             msg="Timestamp for this request is outside of the recvWindow."),
        case("duplicate_client_id", "placed", kind="duplicate"),
        case("partial_fill", "partial", kind="partial", ratio="0.5"),
        case("malformed_json", "placed", kind="malformed", process=True),
        # The protective stop itself refused once (a 503): the position must still end up protected. The
        # stop 2 % away, so no dip between the entry and the freeze closes the position first.
        case("stop_order_503", "not_placed", order_type="STOP_LOSS", freeze=True, kind="http", status=503,
             env=(("SPOT_STOP_LOSS_PCT", "2"),)),
    ]


class ScenarioLane(Lane):
    """A lane that runs one scenario on a daemon that is not killed (unless the scenario says so)."""

    async def run(self) -> Outcome:
        out = Outcome(self.result.lane, self.result)
        try:
            await self.open()
            await self.scenario(out)
        except HARNESS_TROUBLE as exc:
            self.result.aborted = repr(exc)
        finally:
            await self.close()
        return out

    async def scenario(self, out: Outcome) -> None:
        raise NotImplementedError

    async def poll(self, ready: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        deadline = self.clock.monotonic() + timeout
        while self.clock.monotonic() < deadline:
            if ready(await self.fake.summary()):
                return True
            await self.clock.sleep(0.02)
        return False

    async def finish(self, settle: float = FINAL_POLL_SECONDS) -> dict[str, Any]:
        """SIGTERM after `settle` seconds on a frozen market, then the checks; returns the fake's state.
        The daemon learns of a resting order's fill at its next order poll, so `settle` must span one."""
        self.moving = False
        await self.stop_cleanly(settle)
        await self.check()
        out: dict[str, Any] = await self.fake.get("/_fake/state")
        return out


def _reprotected(events: list[dict[str, Any]], mark: int) -> bool:
    """Every symbol whose protective stop was refused after `mark` has had one placed since."""
    pending: set[str] = set()
    for e in events[mark:]:
        name = str(e.get("event", ""))
        if name.startswith("no protective stop"):
            pending.add(str(e.get("symbol")))
        elif name == "protective stop placed":
            pending.discard(str(e.get("symbol")))
    return not pending and any(str(e.get("event", "")).startswith("no protective stop") for e in events[mark:])


class FaultLane(ScenarioLane):
    def __init__(self, case: FaultCase, config: LaneConfig, workdir: Path, closes: dict[str, list[Decimal]],
                 seed: int, clock: Clock, wait_after: float) -> None:
        config = dataclasses.replace(config, env=config.env + case.env)
        super().__init__(case.name, config, workdir, closes, random.Random(f"{seed}-{case.name}"), clock)
        self.case = case
        self.wait_after = wait_after

    async def scenario(self, out: Outcome) -> None:
        daemon = await self.ensure_up()
        await self.fake.post("/_fake/faults", dict(self.case.fault))
        consumed = await self.poll(lambda s: s["faults"] == 0, 30.0)
        if self.case.freeze:
            self.moving = False
        mark = len(daemon.events)
        # The faulted order settled (after the order manager's grace period, if it was refused) ...
        await daemon.wait_for(lambda: any(e.get("event") in ("order rejected", "unknown order resolved", "entry",
                                                             "exit") for e in daemon.events[mark:]),
                              self.wait_after)
        consumed_at = (await self.fake.summary())["creates"]
        # ... and trading goes on: more orders after it; on a frozen market, the refused stop placed again
        # (the engine retries a refused protective stop after a backoff).
        if self.case.freeze:
            await daemon.wait_for(functools.partial(_reprotected, daemon.events, mark), self.wait_after)
        else:
            await self.poll(lambda s: s["creates"] >= consumed_at + 2, self.wait_after)
        orders_after = (await self.fake.summary())["creates"] - consumed_at
        running = daemon.running
        state = await self.finish()
        ledger = await asyncio.to_thread(lambda: {r["client_order_id"]: r for r in
                                                  _ledger_rows(self.data_dir / "ledger.sqlite3")[0]})
        out.details.update(consumed=consumed, orders_after=orders_after, running_after_fault=running)
        self._judge(out, state, ledger)
        if not consumed:
            out.problems.append("the fault was never hit")
        if not running:
            out.problems.append("the daemon was not running after the fault")
        if not self.case.freeze and orders_after < 2:
            out.problems.append(f"only {orders_after} orders after the fault: the daemon stopped trading")

    def _judge(self, out: Outcome, state: dict[str, Any], ledger: dict[str, sqlite3.Row]) -> None:
        hits = [f["client_order_id"] for f in state["fault_log"]]
        cid = hits[0] if hits else None
        if cid is None or cid not in ledger:
            out.problems.append(f"the fault hit no order of the ledger (fault log {state['fault_log']})")
            return
        row = ledger[cid]
        on_exchange = [o for o in state["orders"] if o["client_order_id"] == cid and o["market"] == "spot"]
        exchange = on_exchange[0] if on_exchange else None
        out.details.update(client_order_id=cid, ledger_state=row["state"], ledger_filled=row["filled"],
                           exchange_status=exchange and exchange["status"],
                           exchange_executed=exchange and exchange["executed"])
        if self.case.expect == "not_placed":
            if exchange is not None:
                out.problems.append(f"{cid} is on the exchange ({exchange['status']}); the fault refused it")
            if row["state"] != "rejected":
                out.problems.append(f"{cid} is {row['state']} in the ledger, expected rejected (never placed)")
            return
        if exchange is None:
            out.problems.append(f"{cid} is not on the exchange; the fault let it through")
            return
        if Decimal(row["filled"]) != Decimal(exchange["executed"]):
            out.problems.append(f"{cid}: ledger filled {row['filled']}, exchange {exchange['executed']}")
        if row["state"] in ("pending", "unknown", "rejected"):
            out.problems.append(f"{cid} is {row['state']} in the ledger, but the exchange has it")
        if self.case.expect == "partial" and Decimal(exchange["executed"]) >= Decimal(exchange["quantity"]):
            out.problems.append(f"{cid} filled completely; the fault was to fill part of it")


class StopAnswerLostLane(ScenarioLane):
    """The daemon dies while its protective stop's answer is in flight (the exchange has placed it).
    After the restart the position must be protected by that stop, and the ledger must know it: else
    the engine sends a second stop and take-profit sells that the locked coins cannot cover."""

    async def scenario(self, out: Outcome) -> None:
        await self.ensure_up()
        hit = False
        # A stop the exchange refuses outright ("would trigger immediately" after a quick move) answers
        # at once despite the fault; try again until one rests on the exchange with its answer held.
        for _ in range(6):
            await self.fake.post("/_fake/faults", {"kind": "delay", "path": "/api/v3/order", "method": "POST",
                                                   "seconds": 30, "process": True,
                                                   "when": {"type": list(STOP_TYPES)}})
            if not await self.poll(lambda s: s["faults"] == 0, 40.0):
                break
            await self.clock.sleep(0.05)
            if (await self.fake.summary())["fault_status"] in OPEN:
                hit = True
                break
        # Frozen, so the stop neither fires nor is overtaken while the daemon is down.
        self.moving = False
        await self.kill()
        await self.fake.post("/_fake/clear", {})
        out.details.update(stop_in_flight_when_killed=hit)
        if not hit:
            out.problems.append("no protective stop was sent")
            return
        restarted = await self.ensure_up()
        # Room for the engine to protect, and for the market to offer a take-profit.
        await restarted.wait_for(lambda: False, 2.0)
        await self.finish()
        out.details.update(refused_orders=len(self.result.refused_orders))
        out.problems.extend(f"refused by the exchange: {r}" for r in self.result.refused_orders)


class RoundTripDustLane(ScenarioLane):
    """Fees as Binance charges them by default (a buy's fee out of the coins bought). After a position
    is closed, nothing of it may stay behind in the ledger as an open position."""

    async def scenario(self, out: Outcome) -> None:
        await self.ensure_up()
        sold = await self.poll(lambda s: s["sells"] >= 1, 40.0)
        state = await self.finish()
        out.details.update(round_trip=sold, trades=len(state["trades"]))
        if not sold:
            out.problems.append("no position was closed in time")


async def run_scenarios(workdir: Path, *, seed: int = 7, config: LaneConfig | None = None,
                        names: Iterable[str] | None = None, wait_after: float = 45.0,
                        clock: Clock | None = None) -> dict[str, Outcome]:
    """Every fault case and scenario in its own lane, all at once (faults that refuse an order make the
    daemon wait out its grace period before it settles the order; side by side those waits overlap)."""
    clock = clock or LiveClock()
    config = config or LaneConfig()
    timeout = float(config.daemon_env()["EXCHANGE_TIMEOUT_SECONDS"])
    closes = await load_all_closes(config.symbols())
    wanted = set(names) if names is not None else None

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}-{name}")

    lanes: list[ScenarioLane] = [FaultLane(case, config, workdir, closes, seed, clock, wait_after)
                                 for case in fault_cases(timeout)]
    lanes.append(StopAnswerLostLane("stop_answer_lost", config, workdir, closes, rng("stop_answer_lost"), clock))
    dust_config = dataclasses.replace(config, fee_asset="base")
    lanes.append(RoundTripDustLane("round_trip_dust", dust_config, workdir, closes, rng("round_trip_dust"), clock))
    lanes = [lane for lane in lanes if wanted is None or lane.result.lane in wanted]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(lane.run()) for lane in lanes]
    return {t.result().name: t.result() for t in tasks}


# --- the checks -------------------------------------------------------------------------------------

def _ledger_rows(path: Path) -> tuple[list[sqlite3.Row], list[sqlite3.Row], list[sqlite3.Row]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        orders = conn.execute("SELECT * FROM orders").fetchall()
        fills = conn.execute("SELECT * FROM fills").fetchall()
        positions = conn.execute("SELECT * FROM positions").fetchall()
    finally:
        conn.close()
    return orders, fills, positions


def check_lane(state: dict[str, Any], ledger_path: Path) -> Checks:
    """The invariants, on the fake's record (`/_fake/state`) and the ledger (read-only).

    - no client order id in two POSTs; no order on the exchange that the ledger does not know (an
      intent sent twice would show as one of these);
    - every execution on the exchange is a ledger fill of the same order, amount and price, and the
      ledger has no fill the exchange did not make; filled amounts agree;
    - every position the ledger holds has an open stop-loss sell on the exchange covering it, and the
      account holds what the ledger says;
    - nothing left pending or unknown, and open orders agree both ways.
    """
    orders, fills, positions = _ledger_rows(ledger_path)
    checks = Checks(orders=len(orders), fills=len(fills), positions=len(positions))
    ledger_orders = {r["client_order_id"]: r for r in orders}
    fake_orders = [o for o in state["orders"] if o["market"] == "spot"]
    fake_by_cid: dict[str, list[dict[str, Any]]] = {}
    for o in fake_orders:
        fake_by_cid.setdefault(o["client_order_id"], []).append(o)
    posts = Counter(cid for market, cid in state["create_calls"] if market == "spot")

    checks.reused_client_ids = [f"{cid} POSTed {n} times" for cid, n in posts.items() if n > 1]
    for cid, same in fake_by_cid.items():
        if cid not in ledger_orders:
            o = same[0]
            checks.orphan_orders.append(f"{cid}: {o['side']} {o['type']} {o['quantity']} {o['symbol']} "
                                        f"({o['status']}) is on the exchange, not in the ledger")
        if len(same) > 1:
            checks.orphan_orders.append(f"{cid}: {len(same)} exchange orders")
    checks.never_sent = sum(1 for cid in ledger_orders if cid not in posts)

    ledger_fills = {(r["client_order_id"], r["trade_id"]): r for r in fills}
    by_order_id = {o["order_id"]: o for o in fake_orders}
    made: set[tuple[str, str]] = set()
    for t in state["trades"]:
        if t["market"] != "spot":
            continue
        key = (by_order_id[t["order_id"]]["client_order_id"], str(t["trade_id"]))
        made.add(key)
        row = ledger_fills.get(key)
        if row is None:
            checks.lost_fills.append(f"{key[0]} trade {key[1]}: {t['side']} {t['qty']} {t['symbol']} @ {t['price']}")
        elif Decimal(row["amount"]) != Decimal(t["qty"]) or Decimal(row["price"]) != Decimal(t["price"]):
            checks.fill_mismatches.append(f"{key}: ledger {row['amount']} @ {row['price']}, exchange "
                                          f"{t['qty']} @ {t['price']}")
    checks.phantom_fills = [f"{cid} trade {tid}" for cid, tid in ledger_fills if (cid, tid) not in made]
    for cid, row in ledger_orders.items():
        theirs = fake_by_cid.get(cid)
        if theirs and Decimal(row["filled"]) != Decimal(theirs[0]["executed"]):
            checks.fill_mismatches.append(f"{cid}: ledger filled {row['filled']}, exchange {theirs[0]['executed']}")

    _check_positions(checks, state, fake_orders, positions)

    for cid, row in ledger_orders.items():
        if row["state"] in ("pending", "unknown"):
            checks.unsettled.append(f"{cid} {row['state']} ({row['reason']})")
        status = fake_by_cid[cid][0]["status"] if cid in fake_by_cid else "absent"
        if (status in OPEN) != (row["state"] in ("open", "partially_filled")):
            checks.state_mismatches.append(f"{cid}: ledger {row['state']}, exchange {status}")
    return checks


def _check_positions(checks: Checks, state: dict[str, Any], fake_orders: list[dict[str, Any]],
                     positions: list[sqlite3.Row]) -> None:
    open_stops: dict[str, list[dict[str, Any]]] = {}
    for o in fake_orders:
        if o["status"] in OPEN and o["type"] in STOP_TYPES and o["side"] == "SELL":
            open_stops.setdefault(o["symbol"], []).append(o)
    balances = {asset: Decimal(free) + Decimal(locked) for asset, (free, locked) in state["spot_balances"].items()}
    prices = {s: Decimal(p) for s, p in state["prices"].items()}
    held_symbols: set[str] = set()
    for p in positions:
        sym = exchange_symbol(p["symbol"])
        held_symbols.add(sym)
        spec = SYMBOLS[sym]
        amount = Decimal(p["amount"])
        step = Decimal(spec.spot_step)
        sellable = (amount / step).to_integral_value(rounding=ROUND_DOWN) * step
        stop_cid = json.loads(p["meta"] or "{}").get("stop_order")
        covering = [o for o in open_stops.get(sym, []) if Decimal(o["quantity"]) >= sellable]
        held = balances.get(spec.base, Decimal(0))
        if held < amount:
            checks.holdings_mismatches.append(f"{p['symbol']}: ledger holds {amount}, account {held}")
        if sellable <= 0 or sellable * prices[sym] < Decimal(spec.spot_min_notional):
            checks.dust_positions.append(f"{p['symbol']} {amount} (below the exchange's minimum order; "
                                         f"stop order {stop_cid})")
        elif not covering:
            checks.unprotected.append(f"{p['symbol']} {amount} (stop price {p['stop_loss']}, stop order "
                                      f"{stop_cid}): no open stop-loss sell covering it on the exchange")
        elif stop_cid not in {o["client_order_id"] for o in covering}:
            checks.unlinked_stops.append(f"{p['symbol']} {amount}: the ledger's stop order {stop_cid} is not the "
                                      f"open stop {[o['client_order_id'] for o in covering]}")
    for sym, spec in SYMBOLS.items():
        held = balances.get(spec.base, Decimal(0))
        if sym not in held_symbols and held * prices[sym] >= Decimal(spec.spot_min_notional):
            checks.holdings_mismatches.append(f"{sym}: account holds {held} {spec.base}, ledger has no position")


# --- reporting --------------------------------------------------------------------------------------

def format_report(report: ChaosReport, problems_shown: int = 40) -> str:
    lines = [json.dumps(report.summary(), indent=1)]
    problems = report.problems()
    lines.extend(problems[:problems_shown])
    if len(problems) > problems_shown:
        lines.append(f"... and {len(problems) - problems_shown} more")
    return "\n".join(lines)


def kills_table(kills: Iterable[Kill]) -> str:
    return "\n".join(f"lane {k.lane} kill {k.index:3d} run {k.run:4d} {k.phase:15s} "
                     f"{'hit ' if k.hit else 'MISS'} {k.seconds:5.1f}s {k.detail}" for k in kills)


def format_outcomes(outcomes: Iterable[Outcome]) -> str:
    lines = []
    for o in outcomes:
        details = " ".join(f"{k}={v}" for k, v in o.details.items())
        problems = o.all_problems()
        lines.append(f"{o.name:20s} {'ok' if not problems else 'PROBLEMS'} exit={o.lane.final_exit_code} {details}")
        lines.extend(f"    {p}" for p in problems)
    return "\n".join(lines)
