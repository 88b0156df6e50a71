"""Review findings on the entry points, the settings and the market data, one test (or a few) each:
--replay refused outside paper trading, replay files in epoch seconds, Binance's forming kline with the
host clock ahead, a .env that is not UTF-8, misspelt names in .env, an --env-file that is not there, and
--speed nan/inf."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import main as cli
from config import Settings, load_settings
from core.clock import SimClock
from core.errors import ConfigError, DependencyError
from exchange.candles import load_candles
from exchange.replay import ReplayFeed
from tests import test_feeds as feeds_tests
from tests.bounded import bounded
from tests.test_feeds import FIVE_MIN, FORMING, FakeBinance, kline_rows, live_feed, next_version

ROOT = Path(__file__).resolve().parent.parent
HEADER = "timestamp_ms,open,high,low,close,volume"
T0 = 1_609_459_200_000  # 2021-01-01 00:00 UTC, in ms


@pytest.fixture(autouse=True)
def _no_settings_in_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the developer's environment, and no .env from the working directory."""
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()]


# --- 1. --replay with TRADING_MODE=live or testnet ---------------------------------------------------


@pytest.mark.parametrize("mode", ["live", "testnet"])
def test_replay_is_refused_unless_trading_mode_is_paper(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The replay feeds 2020-21 prices to engines whose orders, in live or testnet, go to Binance. The
    # exchange URL is a closed loopback port, so a daemon that does start never reaches the internet.
    for name, value in {
        "TRADING_MODE": mode, "BINANCE_API_KEY": "fake-binance-api-key-0123456789",
        "BINANCE_API_SECRET": "fake-binance-api-secret-9876543210", "DATA_DIR": str(tmp_path / "var"),
        "EXCHANGE_URL_OVERRIDE": f"http://127.0.0.1:{free_port()}", "EXCHANGE_MAX_RETRIES": "0",
        "EXCHANGE_TIMEOUT_SECONDS": "2", "STARTUP_STAGE_TIMEOUT_SECONDS": "10", "LOG_FORMAT": "json",
        "LOOPLAG_ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["--replay", "--speed", "20000"]) == 78
    assert cli_errors(capsys) == [
        f"config error: TRADING_MODE={mode}: --replay trades on recorded prices and runs only with "
        "TRADING_MODE=paper"
    ]
    assert not (tmp_path / "var").exists()  # refused before anything started: no ledger, no lock


def test_replay_in_paper_and_live_without_replay_pass_the_mode_check() -> None:
    paper = load_settings(env_file=None)
    assert cli.mode_problems(paper, cli.parse_args(["--replay"])) == []
    live = load_settings(env_file=None, trading_mode="live", binance_api_key="k", binance_api_secret="s")
    assert cli.mode_problems(live, cli.parse_args([])) == []


# --- 2. replay files whose timestamps are not epoch milliseconds -----------------------------------


async def test_seconds_timestamps_are_a_clear_dependency_error_not_zero_division(tmp_path: Path) -> None:
    # A user's own 5m export with epoch *seconds* in the first column (a very common CSV shape): before,
    # the bars looked 300 ms apart and resample() divided by a 0 s timeframe (traceback, exit 1).
    t0 = 1_700_000_100
    rows = [f"{t0 + 300 * i},100,101,99,100.5,10" for i in range(50)]
    path = tmp_path / "binance_BTC_USDT-5m.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    feed = ReplayFeed({"BTC/USDT": path}, SimClock(), base_timeframe="5m", warmup_bars=5)
    with pytest.raises(DependencyError, match=r"binance_BTC_USDT-5m\.csv.*epoch milliseconds"):
        await feed.load()


@pytest.mark.parametrize(
    ("first", "step"),
    [(T0 * 1000, FIVE_MIN * 1000), (T0, 500)],
    ids=["microseconds", "half-second-bars"],
)
def test_candle_files_not_in_epoch_milliseconds_are_rejected(tmp_path: Path, first: int, step: int) -> None:
    path = tmp_path / "binance_AAA_USDT-5m.csv"
    path.write_text("\n".join([HEADER, *(f"{first + step * i},100,101,99,100.5,10" for i in range(20))]) + "\n")
    with pytest.raises(DependencyError, match=r"binance_AAA_USDT-5m\.csv.*epoch milliseconds"):
        load_candles(path)


# --- 3. the forming kline with the host clock ahead of Binance's -------------------------------------


binance = feeds_tests.binance  # the fixture: tests/test_feeds.py's loopback Binance public API


@bounded(30)
async def test_forming_kline_is_not_served_as_closed_when_host_clock_is_2s_ahead(binance: FakeBinance) -> None:
    # Binance (the fake) answers with 30 klines, the newest (open time FORMING) still forming. The host
    # clock is 2 s ahead of Binance's: for Binance the kline has 1 s to go.
    clock = SimClock(start=(FORMING + FIVE_MIN) / 1000 + 1)
    feed = live_feed(clock, binance.base_url)
    await feed.start()
    try:
        await next_version(feed, 0)
        candles = feed.candles("BTC/USDT", "5m", limit=100)
        assert candles is not None
        assert candles.ts[-1] * 1000 == FORMING - FIVE_MIN, "the forming kline was served as closed"
    finally:
        await feed.stop()


@bounded(30)
async def test_a_closed_newest_kline_is_held_back_one_candle_poll_at_most(binance: FakeBinance) -> None:
    # No kline opened yet after FORMING - 5m closed (a halted market): the newest row is closed, 1 s ago
    # by our clock. It may be the forming one of a Binance clock 1 s behind, so this poll holds it back;
    # the next (candle_poll_seconds = 60 later) serves it.
    binance.klines["BTCUSDT"] = kline_rows(30, 37000.0)[:-1]
    clock = SimClock(start=FORMING / 1000 + 1)
    feed = live_feed(clock, binance.base_url)
    await feed.start()
    try:
        await next_version(feed, 0)
        candles = feed.candles("BTC/USDT", "5m", limit=100)
        assert candles is not None and candles.ts[-1] * 1000 == FORMING - 2 * FIVE_MIN
        for _ in range(12):  # 60 s in steps of poll_seconds, each round waited for (the sockets are real)
            version = feed.version
            await clock.advance(5)
            await next_version(feed, version)
        candles = feed.candles("BTC/USDT", "5m", limit=100)
        assert candles is not None and candles.ts[-1] * 1000 == FORMING - FIVE_MIN
    finally:
        await feed.stop()


@bounded(30)
async def test_with_the_host_clock_behind_the_kline_binance_just_closed_waits_for_ours(
    binance: FakeBinance,
) -> None:
    # Binance's clock has passed FORMING (its new kline opened), ours is 2 s short of it: the clock check
    # still holds back the kline that, by our clock, has not ended.
    clock = SimClock(start=FORMING / 1000 - 2)
    feed = live_feed(clock, binance.base_url)
    await feed.start()
    try:
        await next_version(feed, 0)
        candles = feed.candles("BTC/USDT", "5m", limit=100)
        assert candles is not None and candles.ts[-1] * 1000 == FORMING - 2 * FIVE_MIN
    finally:
        await feed.stop()


# --- 4. a .env that is not UTF-8 ------------------------------------------------------------------


def test_env_file_with_a_non_utf8_byte_exits_78_without_traceback(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"# r\xe9glages\nSPOT_MAX_POSITIONS=2\n")  # a Latin-1 comment
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "check-config"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [
        "config error: .env: not UTF-8 text (byte 0xe9 on line 1); save the file as UTF-8"
    ]


# --- 5. names in the .env file that are no setting -------------------------------------------------


def test_misspelled_settings_in_env_file_are_reported_with_the_right_name(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("SPOT_STOP_LOS_PCT=0.5\ntrading_mod=live\nSPOT_MAX_POSITIONS=zero\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=env)
    assert info.value.problems[:2] == [
        f"unknown setting SPOT_STOP_LOS_PCT in {env} (did you mean SPOT_STOP_LOSS_PCT?)",
        f"unknown setting trading_mod in {env} (did you mean TRADING_MODE?)",
    ]
    # Reported with the other problems at once.
    assert [line.split(":")[0] for line in info.value.problems[2:]] == ["SPOT_MAX_POSITIONS"]


def test_unknown_names_in_the_process_environment_stay_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOT_STOP_LOS_PCT", "0.5")  # the environment holds PATH and HOME, and this
    (tmp_path / ".env").write_text("spot_max_positions=7\n")
    assert load_settings(env_file=tmp_path / ".env").spot_max_positions == 7


def test_env_file_values_keep_their_place_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / ".env"
    env.write_text("SPOT_MAX_POSITIONS=7\nSPOT_TAKE_PROFIT_PCT=\nSPOT_STOP_LOSS_PCT=0.9\n")
    monkeypatch.setenv("SPOT_MAX_POSITIONS", "4")  # the environment overrides the file
    monkeypatch.setenv("SPOT_STOP_LOSS_PCT", "")  # empty counts as unset, in either place
    s = load_settings(env_file=env)
    assert (s.spot_max_positions, s.spot_take_profit_pct, s.spot_stop_loss_pct) == (4, 2.0, 0.9)
    assert load_settings(env_file=env, spot_max_positions=9).spot_max_positions == 9


@bounded(30)
async def test_an_env_file_that_is_a_pipe_is_read_once_and_applied(tmp_path: Path) -> None:
    # `--env-file <(decrypt prod.env)`: the file is read once, to check it and to load it.
    fifo = tmp_path / "prod.env"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("w") as fh:
            fh.write("SPOT_MAX_POSITIONS=7\n")

    threading.Thread(target=write, daemon=True).start()
    s = await asyncio.to_thread(load_settings, env_file=fifo, env_file_required=True)
    assert s.spot_max_positions == 7


# --- 6. an --env-file that does not exist ------------------------------------------------------------


def test_explicit_env_file_that_does_not_exist_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "prod.env"
    assert cli.main(["check-config", "--env-file", str(missing)]) == 78
    assert cli_errors(capsys) == [f"config error: {missing}: settings file not found"]


def test_the_default_env_file_may_be_missing_or_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 0
    (tmp_path / ".env").mkdir()  # `python -m venv .env`
    assert cli.main(["check-config"]) == 0
    assert cli_errors(capsys) == []


# --- 7. --speed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("speed", ["nan", "inf", "-inf", "0", "-1", "1000001"])
def test_speed_must_be_finite_above_0_and_at_most_a_million(speed: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--replay", "--speed", speed])
    assert info.value.code == 2


def test_speed_of_a_million_is_accepted_and_the_replay_feed_refuses_nan(tmp_path: Path) -> None:
    assert cli.parse_args(["--replay", "--speed", "1e6"]).speed == 1_000_000
    for speed in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            ReplayFeed({"BTC/USDT": tmp_path / "binance_BTC_USDT-5m.csv"}, SimClock(), speed=speed)
