"""Settings: every variable is documented and loadable, every problem is reported at once, one line each,
naming the variable; `check-config` masks secrets; the CLI exits 78 on bad settings without a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import Settings, load_settings
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in {f.upper() for f in Settings.model_fields}:
            monkeypatch.delenv(name, raising=False)


def example_vars() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_env_example_lists_every_setting_with_a_comment() -> None:
    documented = example_vars()
    missing = [f.upper() for f in Settings.model_fields if f.upper() not in documented]
    assert not missing, f".env.example lacks {missing}"
    unknown = [v for v in documented if v.lower() not in Settings.model_fields]
    assert not unknown, f".env.example documents settings that do not exist: {unknown}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[A-Z][A-Z0-9_]+=", line):
            assert i > 0 and lines[i - 1].startswith("#") and not re.match(r"^#\s*[A-Z_]+=", lines[i - 1]), (
                f"{line!r} needs a one-line comment above it"
            )


def test_env_example_loads_as_is_and_is_safe(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(ENV_EXAMPLE.read_text())
    s = load_settings(env_file=env)
    assert s.trading_mode == "paper"
    assert s.binance_api_key is None and s.telegram_bot_token is None


def test_defaults_are_paper_spot_only() -> None:
    s = load_settings(env_file=None)
    assert s.trading_mode == "paper"
    assert s.enabled_engines() == ["spot"]
    assert s.health_warning_seconds == 60 and s.health_restart_seconds == 300


_VALID_VALUES = {
    "SPOT_ALLOCATION_PCT": st.floats(0, 60).map(lambda x: f"{x:.2f}"),
    "FUTURES_ALLOCATION_PCT": st.floats(0, 40).map(lambda x: f"{x:.2f}"),
    "SPOT_STOP_LOSS_PCT": st.floats(0.1, 50).map(lambda x: f"{x:.3f}"),
    "SPOT_MAX_POSITIONS": st.integers(1, 100).map(str),
    "HEALTH_CHECK_INTERVAL_SECONDS": st.floats(0.5, 600).map(lambda x: f"{x:.1f}"),
    "SPOT_SYMBOLS": st.lists(st.sampled_from(["BTC/USDT", "ETH/USDT", "SOL/USDT", "xrp/usdt"]),
                             min_size=1, max_size=4, unique=True).map(",".join),
    "TELEGRAM_CHAT_IDS": st.lists(st.integers(-10**12, 10**12), max_size=3).map(
        lambda xs: ",".join(map(str, xs))),
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional=_VALID_VALUES))
def test_valid_environment_values_load_to_the_same_values(values: dict[str, str]) -> None:
    """Config loading completeness: whatever valid subset is set, each value arrives typed and intact."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        s = load_settings(env_file=None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for name, raw in values.items():
        got = getattr(s, name.lower())
        if name == "SPOT_SYMBOLS":
            assert got == [x.upper() for x in raw.split(",")]
        elif name == "TELEGRAM_CHAT_IDS":
            assert got == [int(x) for x in raw.split(",") if x]
        else:
            assert float(got) == pytest.approx(float(raw))


_BAD_VALUES = {
    "SPOT_ALLOCATION_PCT": "140",
    "SPOT_STOP_LOSS_PCT": "-1",
    "SPOT_MAX_POSITIONS": "zero",
    "TRADING_MODE": "yolo",
    "HEALTH_WARNING_SECONDS": "-5",
    "SPOT_TIMEFRAME": "7m",
    "SPOT_SYMBOLS": "BTCUSDT",
    "LOG_FORMAT": "xml",
    "GLOBAL_MAX_DRAWDOWN_PCT": "0",
}


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(sorted(_BAD_VALUES)), min_size=1))
def test_every_bad_value_is_reported_once_naming_its_variable(bad: set[str]) -> None:
    """Missing/invalid config validation: all problems at once, each line names its variable."""
    old = {k: os.environ.get(k) for k in bad}
    os.environ.update({k: _BAD_VALUES[k] for k in bad})
    try:
        with pytest.raises(ConfigError) as info:
            load_settings(env_file=None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    problems = info.value.problems
    for name in bad:
        assert sum(line.startswith(name + ":") for line in problems) == 1, (name, problems)
    assert len(problems) == len(bad)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SPOT_ALLOCATION_PCT": "70", "FUTURES_ALLOCATION_PCT": "40"}, "must be at most 100"),
        ({"HEALTH_WARNING_SECONDS": "300", "HEALTH_RESTART_SECONDS": "300"}, "HEALTH_WARNING_SECONDS"),
        ({"TRADING_MODE": "live"}, "BINANCE_API_KEY: required when TRADING_MODE=live"),
        ({"TRADING_MODE": "testnet", "BINANCE_API_KEY": "k"}, "BINANCE_API_SECRET: required"),
        ({"SPOT_ENABLED": "false"}, "at least one engine"),
        ({"SPOT_EMA_FAST": "30", "SPOT_EMA_SLOW": "20"}, "SPOT_EMA_FAST"),
        ({"TELEGRAM_BOT_TOKEN": "123:abc"}, "TELEGRAM_CHAT_IDS: required"),
        # 30x: liquidated after a 2.83 % move, before the 4 % force close (and the 3 % stop).
        ({"FUTURES_MAX_LEVERAGE": "30", "FUTURES_LEVERAGE_HIGH": "30"},
         "FUTURES_FORCE_CLOSE_PCT (4) must be below 2.83"),
    ],
)
def test_cross_field_rules(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert any(expected in line for line in info.value.problems), info.value.problems


def test_the_force_close_may_sit_just_before_the_liquidation() -> None:
    # 20x: liquidated after 100/20 - 0.5 = 4.5 %; a force close at 4.4 % comes first. The engine's
    # highest leverage is its highest tier's, capped by FUTURES_MAX_LEVERAGE (here the tier's 20).
    s = load_settings(env_file=None, futures_max_leverage=50, futures_leverage_high=20, futures_force_close_pct=4.4)
    assert s.futures_force_close_pct == 4.4
    with pytest.raises(ConfigError, match="FUTURES_FORCE_CLOSE_PCT"):
        load_settings(env_file=None, futures_max_leverage=50, futures_leverage_high=20, futures_force_close_pct=4.5)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    base.update(env)
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], env=base, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_config_exits_78_with_one_line_per_problem_and_no_traceback(tmp_path: Path) -> None:
    proc = _cli(["check-config"], {"SPOT_ALLOCATION_PCT": "150", "TRADING_MODE": "yolo"}, tmp_path)
    assert proc.returncode == 78
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr
    assert any("SPOT_ALLOCATION_PCT" in line for line in lines)
    assert any("TRADING_MODE" in line for line in lines)
    assert "Traceback" not in proc.stderr


def test_cli_run_with_bad_config_also_exits_78(tmp_path: Path) -> None:
    proc = _cli(["--replay"], {"HEALTH_WARNING_SECONDS": "900"}, tmp_path)
    assert proc.returncode == 78
    assert "HEALTH_WARNING_SECONDS" in proc.stderr and "Traceback" not in proc.stderr


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    secret = "s3cr3t-binance-secret-value"
    token = "123456789:AAHsupersecrettokenvalue_abcdefghijk"
    proc = _cli(["check-config"], {
        "TRADING_MODE": "testnet", "BINANCE_API_KEY": "my-api-key-123", "BINANCE_API_SECRET": secret,
        "TELEGRAM_BOT_TOKEN": token, "TELEGRAM_CHAT_IDS": "42", "TELEGRAM_ALLOWED_USER_IDS": "7",
    }, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert secret not in out and token not in out and "my-api-key-123" not in out
    assert "BINANCE_API_SECRET" in out and "**********" in out
    assert "TRADING_MODE" in out and "testnet" in out


def test_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SPOT_MAX_POSITIONS=7\n# comment\nSPOT_SYMBOLS=ETH/USDT\n")
    proc = _cli(["check-config"], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"SPOT_MAX_POSITIONS\s+7", proc.stdout)
    assert re.search(r"SPOT_SYMBOLS\s+ETH/USDT", proc.stdout)


def test_an_empty_settings_file_such_as_dev_null_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks run the daemon with `--env-file /dev/null`: the defaults, whatever `.env` holds."""
    import main as cli

    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name, raising=False)
    assert cli.main(["check-config", "--env-file", os.devnull]) == 0
