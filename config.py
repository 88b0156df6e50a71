"""Every tunable of the daemon, typed, read from the environment and `.env`.

Names are grouped by prefix (`spot_*`, `futures_*`, `global_*`, `health_*`, `paper_*`, ...) and map
one-to-one to upper-case environment variables. `load_settings()` reports every problem at once, one
line each naming the variable, so a bad `.env` is fixed in one pass instead of one error per restart.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import ConfigError

EX_CONFIG = 78
DEFAULT_ENV_FILE = ".env"
MAX_REPLAY_SPEED = 1_000_000
# Binance USD-M's maintenance margin rate for the smaller positions of the main markets (0.4-0.5 %),
# the conservative end: the price move a position survives is 100/leverage % less this.
LIQUIDATION_MAINTENANCE_PCT = 0.5

Pct = Annotated[float, Field(ge=0, le=100)]
PositivePct = Annotated[float, Field(gt=0, le=100)]
Seconds = Annotated[float, Field(gt=0, le=86_400 * 7)]

TIMEFRAME_SECONDS = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "4h": 14_400, "1d": 86_400}

SECRET_FIELDS = ("binance_api_key", "binance_api_secret", "telegram_bot_token")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    # extra="ignore" is for the process environment, which holds PATH and the like; a name in the .env
    # file that is no setting is reported by load_settings() (a misspelt key would otherwise be dropped).
    model_config = SettingsConfigDict(
        env_file=DEFAULT_ENV_FILE, env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        env_ignore_empty=True,
    )

    # --- environment ---------------------------------------------------------------------------
    trading_mode: Literal["paper", "testnet", "live"] = "paper"
    binance_api_key: SecretStr | None = None
    binance_api_secret: SecretStr | None = None
    telegram_bot_token: SecretStr | None = None
    telegram_chat_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    telegram_allowed_user_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    data_dir: Path = Path("var")
    log_format: Literal["console", "json", "auto"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    exchange_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    startup_stage_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 60.0

    # --- paper trading and replay ----------------------------------------------------------------
    paper_starting_balance: Annotated[Decimal, Field(gt=0)] = Decimal("10000")
    paper_taker_fee_pct: Annotated[Decimal, Field(ge=0, le=5)] = Decimal("0.1")
    paper_maker_fee_pct: Annotated[Decimal, Field(ge=0, le=5)] = Decimal("0.1")
    paper_slippage_bps: Annotated[Decimal, Field(ge=0, le=1000)] = Decimal("5")
    paper_spread_bps: Annotated[Decimal, Field(ge=0, le=1000)] = Decimal("2")
    replay_speed: Annotated[float, Field(gt=0, le=MAX_REPLAY_SPEED)] = 600.0
    replay_warmup_bars: Annotated[int, Field(ge=0, le=10_000)] = 1200

    # --- spot engine -----------------------------------------------------------------------------
    spot_enabled: bool = True
    spot_allocation_pct: Pct = 60.0
    spot_symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    )
    spot_timeframe: str = "5m"
    spot_scan_interval_seconds: Seconds = 60.0
    spot_monitor_interval_seconds: Seconds = 5.0
    spot_position_size_pct: PositivePct = 20.0
    spot_max_positions: Annotated[int, Field(ge=1, le=100)] = 3
    spot_stop_loss_pct: Annotated[float, Field(gt=0, le=50)] = 1.5
    spot_take_profit_pct: Annotated[float, Field(gt=0, le=500)] = 2.0
    spot_max_data_age_seconds: Seconds = 120.0
    spot_ema_fast: Annotated[int, Field(ge=2, le=500)] = 9
    spot_ema_slow: Annotated[int, Field(ge=3, le=1000)] = 21
    spot_rsi_period: Annotated[int, Field(ge=2, le=500)] = 14
    spot_rsi_min: Pct = 50.0
    spot_rsi_max: Pct = 75.0
    spot_momentum_lookback: Annotated[int, Field(ge=1, le=500)] = 6
    spot_min_momentum_pct: Annotated[float, Field(ge=0, le=100)] = 0.3
    spot_volume_factor: Annotated[float, Field(ge=0, le=100)] = 1.0

    # --- futures engine --------------------------------------------------------------------------
    futures_enabled: bool = False
    futures_allocation_pct: Pct = 40.0
    futures_symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    )
    # Percentages of price are moves from the entry price before leverage (Position.pnl_pct).
    futures_scan_interval_seconds: Seconds = 60.0
    futures_monitor_interval_seconds: Seconds = 5.0
    futures_max_data_age_seconds: Seconds = 120.0
    futures_fetch_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    futures_scan_top_n: Annotated[int, Field(ge=1, le=100)] = 5
    futures_volume_factor: Annotated[float, Field(gt=0, le=100)] = 1.5
    futures_volume_average_bars: Annotated[int, Field(ge=2, le=500)] = 20
    futures_min_change_pct: Annotated[float, Field(ge=0, le=100)] = 1.0
    futures_analysis_concurrency: Annotated[int, Field(ge=1, le=64)] = 16
    futures_candle_limit: Annotated[int, Field(ge=100, le=1500)] = 200
    futures_ema_fast: Annotated[int, Field(ge=2, le=200)] = 9
    futures_ema_slow: Annotated[int, Field(ge=3, le=400)] = 21
    futures_rsi_period: Annotated[int, Field(ge=2, le=200)] = 14
    futures_rsi_long_min: Pct = 50.0  # long zone [min, max]; the short zone mirrors it (100 - max, 100 - min)
    futures_rsi_long_max: Pct = 70.0
    futures_macd_fast: Annotated[int, Field(ge=2, le=200)] = 12
    futures_macd_slow: Annotated[int, Field(ge=3, le=400)] = 26
    futures_macd_signal: Annotated[int, Field(ge=2, le=200)] = 9
    futures_macd_cross_bars: Annotated[int, Field(ge=1, le=50)] = 3
    futures_atr_period: Annotated[int, Field(ge=2, le=200)] = 14
    futures_min_confidence: Pct = 60.0
    futures_stop_atr_multiple: Annotated[float, Field(gt=0, le=20)] = 2.0
    futures_max_stop_pct: Annotated[float, Field(gt=0, le=50)] = 3.0
    futures_reward_risk_ratio: Annotated[float, Field(gt=0, le=20)] = 1.5
    futures_max_positions: Annotated[int, Field(ge=1, le=100)] = 12
    futures_max_margin_use_pct: PositivePct = 90.0
    futures_max_daily_loss_pct: PositivePct = 5.0
    futures_max_correlated_positions: Annotated[int, Field(ge=1, le=100)] = 3
    futures_correlation_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.8
    futures_correlation_bars: Annotated[int, Field(ge=10, le=1000)] = 48
    futures_max_leverage: Annotated[int, Field(ge=1, le=125)] = 10
    futures_leverage_high_confidence: Pct = 85.0
    futures_leverage_high: Annotated[int, Field(ge=1, le=125)] = 10
    futures_leverage_mid_confidence: Pct = 75.0
    futures_leverage_mid: Annotated[int, Field(ge=1, le=125)] = 7
    futures_leverage_low_confidence: Pct = 65.0
    futures_leverage_low: Annotated[int, Field(ge=1, le=125)] = 5
    futures_leverage_min: Annotated[int, Field(ge=1, le=125)] = 3
    futures_high_volatility_atr_pct: Annotated[float, Field(gt=0, le=100)] = 3.0
    futures_risk_per_trade_pct: PositivePct = 1.0
    futures_max_position_pct: PositivePct = 25.0  # cap on one position's margin, % of the engine's equity
    futures_trailing_activation_pct: Annotated[float, Field(gt=0, le=100)] = 1.5
    futures_trailing_distance_pct: Annotated[float, Field(gt=0, le=100)] = 1.0
    futures_trailing_tighten_pct: Annotated[float, Field(gt=0, le=100)] = 3.0
    futures_trailing_tight_distance_pct: Annotated[float, Field(gt=0, le=100)] = 0.5
    futures_partial_1_pct: Annotated[float, Field(gt=0, le=100)] = 1.5
    futures_partial_1_size_pct: PositivePct = 40.0
    futures_partial_2_pct: Annotated[float, Field(gt=0, le=100)] = 2.5
    futures_partial_2_size_pct: PositivePct = 30.0
    futures_force_close_pct: Annotated[float, Field(gt=0, le=100)] = 4.0
    futures_emergency_close_pct: PositivePct = 5.0

    # --- global risk -----------------------------------------------------------------------------
    global_max_daily_loss_pct: PositivePct = 5.0
    global_max_drawdown_pct: PositivePct = 15.0
    global_circuit_breaker_cooldown_minutes: Annotated[float, Field(gt=0, le=60 * 24 * 30)] = 60.0
    global_kill_switch_loss_pct: PositivePct = 25.0
    global_flatten_on_trip: bool = False

    # --- health and supervision ------------------------------------------------------------------
    health_warning_seconds: Seconds = 60.0
    health_restart_seconds: Seconds = 300.0
    health_check_interval_seconds: Seconds = 5.0
    health_max_restarts: Annotated[int, Field(ge=0, le=1000)] = 5
    health_restart_window_seconds: Seconds = 3600.0
    health_stop_timeout_seconds: Seconds = 10.0
    health_backoff_base_seconds: Annotated[float, Field(ge=0, le=3600)] = 1.0
    health_backoff_max_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0

    # --- exchange client, testnet and live (issue 4) ----------------------------------------------
    # Send every Binance request to this base URL instead (http://127.0.0.1:PORT): loopback fakes only.
    exchange_url_override: Annotated[str, Field(pattern=r"^https?://[^/\s]+$")] | None = None
    exchange_max_retries: Annotated[int, Field(ge=0, le=10)] = 4
    exchange_backoff_base_seconds: Annotated[float, Field(gt=0, le=60)] = 0.25
    exchange_backoff_max_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    # Share of Binance's request-weight limit per minute the daemon may use (both engines together).
    exchange_weight_share_pct: Annotated[float, Field(gt=0, le=100)] = 75.0
    # How long an order whose send had no clear answer may stay "not found" before it is declared never
    # placed. Long enough for the exchange to show an order it did take; the engine's trade lock is held
    # meanwhile, so not much longer.
    order_unknown_grace_seconds: Annotated[float, Field(ge=1, le=600)] = 15.0

    # --- operations: telegram, alerts, systemd, health endpoint (issue 5) -------------------------
    alert_order_fills: bool = True
    alert_position_closes: bool = True
    alert_daily_summary_utc: Annotated[str, Field(pattern=r"^(|([01]\d|2[0-3]):[0-5]\d)$")] = ""
    http_enabled: bool = False
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=1, le=65_535)] = 9108
    looplag_enabled: bool = True
    looplag_threshold_seconds: Annotated[float, Field(gt=0, le=600)] = 2.0
    looplag_check_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5

    @field_validator("telegram_chat_ids", "telegram_allowed_user_ids", "spot_symbols", "futures_symbols",
                     mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("spot_symbols", "futures_symbols")
    @classmethod
    def _symbols_look_like_pairs(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if "/" not in s]
        if bad:
            raise ValueError(f"symbols must look like BASE/QUOTE, got {', '.join(bad)}")
        if not value:
            raise ValueError("at least one symbol is needed")
        return [s.upper() for s in value]

    @field_validator("spot_timeframe")
    @classmethod
    def _known_timeframe(cls, value: str) -> str:
        if value not in TIMEFRAME_SECONDS:
            raise ValueError(f"unknown timeframe {value!r}; one of {', '.join(TIMEFRAME_SECONDS)}")
        return value

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    def enabled_engines(self) -> list[str]:
        return [name for name, on in (("spot", self.spot_enabled), ("futures", self.futures_enabled)) if on]

    def masked(self) -> dict[str, str]:
        """Every effective setting as text, secrets shown only as set or unset."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                out[name] = "**********" if value is not None else "(unset)"
            elif isinstance(value, list):
                out[name] = ",".join(str(v) for v in value)
            else:
                out[name] = str(value)
        return out


def cross_field_problems(s: Settings) -> list[str]:
    """Rules that involve more than one setting; each problem is one line naming the variables."""
    problems: list[str] = []
    total = s.spot_allocation_pct + s.futures_allocation_pct
    if total > 100:
        problems.append(
            f"SPOT_ALLOCATION_PCT + FUTURES_ALLOCATION_PCT: {s.spot_allocation_pct:g} + "
            f"{s.futures_allocation_pct:g} = {total:g}, must be at most 100"
        )
    if s.health_warning_seconds >= s.health_restart_seconds:
        problems.append(
            f"HEALTH_WARNING_SECONDS ({s.health_warning_seconds:g}) must be less than "
            f"HEALTH_RESTART_SECONDS ({s.health_restart_seconds:g})"
        )
    if s.health_backoff_base_seconds > s.health_backoff_max_seconds:
        problems.append("HEALTH_BACKOFF_BASE_SECONDS must not exceed HEALTH_BACKOFF_MAX_SECONDS")
    if s.trading_mode in ("testnet", "live"):
        for name in ("binance_api_key", "binance_api_secret"):
            secret = getattr(s, name)
            if secret is None or not secret.get_secret_value().strip():
                problems.append(f"{name.upper()}: required when TRADING_MODE={s.trading_mode}")
    if s.spot_ema_fast >= s.spot_ema_slow:
        problems.append(
            f"SPOT_EMA_FAST ({s.spot_ema_fast}) must be less than SPOT_EMA_SLOW ({s.spot_ema_slow})"
        )
    if s.spot_rsi_min >= s.spot_rsi_max:
        problems.append(
            f"SPOT_RSI_MIN ({s.spot_rsi_min:g}) must be less than SPOT_RSI_MAX ({s.spot_rsi_max:g})"
        )
    problems.extend(futures_problems(s))
    if not s.enabled_engines():
        problems.append("SPOT_ENABLED / FUTURES_ENABLED: at least one engine must be enabled")
    if s.global_max_daily_loss_pct > s.global_kill_switch_loss_pct:
        problems.append(
            "GLOBAL_MAX_DAILY_LOSS_PCT must not exceed GLOBAL_KILL_SWITCH_LOSS_PCT "
            "(the breaker must trip before the kill switch)"
        )
    if s.telegram_bot_token is not None and not s.telegram_chat_ids:
        problems.append("TELEGRAM_CHAT_IDS: required when TELEGRAM_BOT_TOKEN is set")
    if s.telegram_bot_token is not None and not s.telegram_allowed_user_ids:
        problems.append("TELEGRAM_ALLOWED_USER_IDS: required when TELEGRAM_BOT_TOKEN is set")
    return problems


def futures_problems(s: Settings) -> list[str]:
    """Rules between `futures_*` settings, one line each naming the variables; checked at load time so
    that `check-config` reports them before the daemon starts."""
    problems: list[str] = []
    pairs = (
        ("FUTURES_EMA_FAST", s.futures_ema_fast, "FUTURES_EMA_SLOW", s.futures_ema_slow),
        ("FUTURES_MACD_FAST", s.futures_macd_fast, "FUTURES_MACD_SLOW", s.futures_macd_slow),
        ("FUTURES_MAX_STOP_PCT", s.futures_max_stop_pct, "FUTURES_FORCE_CLOSE_PCT", s.futures_force_close_pct),
    )
    for low_name, low, high_name, high in pairs:
        if low >= high:
            problems.append(f"{low_name} ({low:g}) must be below {high_name} ({high:g})")
    if s.futures_trailing_activation_pct > s.futures_trailing_tighten_pct:
        problems.append(f"FUTURES_TRAILING_ACTIVATION_PCT ({s.futures_trailing_activation_pct:g}) must not exceed "
                        f"FUTURES_TRAILING_TIGHTEN_PCT ({s.futures_trailing_tighten_pct:g})")
    if s.futures_rsi_long_min > s.futures_rsi_long_max:
        problems.append(f"FUTURES_RSI_LONG_MIN ({s.futures_rsi_long_min:g}) must not exceed "
                        f"FUTURES_RSI_LONG_MAX ({s.futures_rsi_long_max:g})")
    if not (s.futures_leverage_high_confidence >= s.futures_leverage_mid_confidence
            >= s.futures_leverage_low_confidence):
        problems.append("FUTURES_LEVERAGE_HIGH_CONFIDENCE >= FUTURES_LEVERAGE_MID_CONFIDENCE >= "
                        "FUTURES_LEVERAGE_LOW_CONFIDENCE is required (tiers go from the highest confidence down)")
    # The widest loss the engine plans for (its own force close; every stop is tighter) must come before
    # the exchange liquidates: at leverage L an isolated position is gone once the price moves about
    # 100/L % minus the maintenance margin against it, and then neither the stop nor the engine acts.
    top = min(s.futures_max_leverage, max(s.futures_leverage_high, s.futures_leverage_mid,
                                           s.futures_leverage_low, s.futures_leverage_min))
    room = 100 / top - LIQUIDATION_MAINTENANCE_PCT
    if s.futures_force_close_pct >= room:
        problems.append(
            f"FUTURES_FORCE_CLOSE_PCT ({s.futures_force_close_pct:g}) must be below {room:.2f}: at the highest "
            f"leverage the engine may use ({top}x, from FUTURES_MAX_LEVERAGE and FUTURES_LEVERAGE_*) a position "
            f"is liquidated after a {room:.2f}% move, before its stop or force close"
        )
    return problems


def _describe(error: Any) -> str:
    loc = error.get("loc") or ()
    name = str(loc[0]).upper() if loc else "SETTINGS"
    value = error.get("input")
    if name in {f.upper() for f in SECRET_FIELDS}:
        shown = "(hidden)"
    else:
        shown = repr(value) if value is not None and not isinstance(value, dict) else ""
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{name}: {msg}" + (f" (got {shown})" if shown else "")


def read_env_file(path: Path, *, required: bool = False) -> dict[str, str | None]:
    """The entries of a .env file, or ConfigError naming the file when it cannot be used.

    A missing file is no problem unless `required` (a file named on the command line): the default .env
    is optional, and so is anything at its path that is not a file (`python -m venv .env` makes a folder
    of that name), as pydantic-settings has it.
    """
    if not required and not (path.is_file() or path.is_fifo()):
        return {}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: settings file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the settings file ({exc.strerror or exc})"]) from None
    try:
        text = raw.decode("utf-8-sig")  # an editor's byte-order mark is no part of the first name
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8"
        ]) from None
    return dotenv_values(stream=io.StringIO(text))


def unknown_names(values: Mapping[str, str | None], path: Path) -> list[str]:
    """One line for each name in a .env file that is no setting, with the closest setting's name.

    Only the file's names are checked: the process environment holds PATH, HOME and the like. Every
    variable the program reads from .env, and every one .env.example and the READMEs document, is a
    Settings field, so there is no other name to allow.
    """
    known = [name.upper() for name in Settings.model_fields]
    problems = []
    for name in values:
        if name.lower() in Settings.model_fields:  # case-insensitive, as the settings are read
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown setting {name} in {path}{hint}")
    return problems


def load_settings(
    env_file: str | Path | None = DEFAULT_ENV_FILE, *, env_file_required: bool = False, **overrides: Any
) -> Settings:
    """Build Settings from the environment, `env_file` (None: no file) and `overrides`, or raise
    ConfigError listing every problem, one line each. `env_file_required`: a missing file is an error."""
    problems: list[str] = []
    values: dict[str, str | None] = {}
    if env_file is not None:
        path = Path(env_file)
        values = read_env_file(path, required=env_file_required)
        problems.extend(unknown_names(values, path))
    # The file is read once, here, and its values go in below the environment's: a second read by
    # pydantic-settings would find a pipe (`--env-file <(decrypt prod.env)`) empty.
    in_env = {name.lower() for name, value in os.environ.items() if value != ""}
    from_file = {name.lower(): value for name, value in values.items()
                 if value and name.lower() in Settings.model_fields and name.lower() not in in_env}
    try:
        settings = Settings(_env_file=None, **{**from_file, **overrides})  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(problems + [_describe(e) for e in exc.errors()]) from None
    problems.extend(cross_field_problems(settings))
    if problems:
        raise ConfigError(problems)
    return settings
