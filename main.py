"""Kinetic Empire's command line: `run` (the daemon, the default), `check-config`.

Exit codes: 0 after a clean stop, 78 (EX_CONFIG) for bad settings — printed one line per problem, no
traceback, so systemd does not restart-loop on them — and 1 for a crash or a failed start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from pathlib import Path

from config import DEFAULT_ENV_FILE, EX_CONFIG, MAX_REPLAY_SPEED, SECRET_FIELDS, Settings, load_settings
from core.clock import LiveClock
from core.errors import ConfigError

BUNDLED_DATA = Path(__file__).resolve().parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="main.py", description="Kinetic Empire: a crypto trading daemon (paper trading by default)."
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "check-config"],
                        help="run the daemon (default) or print the effective settings and exit")
    parser.add_argument("--replay", nargs="?", const=str(BUNDLED_DATA), default=None, metavar="PATH",
                        help="paper-trade on recorded candles instead of live data; PATH is a CSV(.gz) "
                             "file or a folder of them (default: the bundled Binance sample)")
    parser.add_argument("--speed", type=float, default=None,
                        help="replay speed factor (default: REPLAY_SPEED, 600 = a 5m candle every 0.5 s)")
    parser.add_argument("--env-file", default=None,
                        help=f"settings file to read; it must exist (default: {DEFAULT_ENV_FILE}, if present)")
    args = parser.parse_args(argv)
    # The same bounds as REPLAY_SPEED: float() takes "nan" and "inf", which no comparison with 0 catches.
    if args.speed is not None and not (math.isfinite(args.speed) and 0 < args.speed <= MAX_REPLAY_SPEED):
        parser.error(f"--speed must be a number above 0 and at most {MAX_REPLAY_SPEED:,.0f}, got {args.speed:g}")
    return args


def mode_problems(settings: Settings, args: argparse.Namespace) -> list[str]:
    """Settings that clash with the command line, one line each naming the variable.

    A replay feeds recorded prices (the bundled ones are from 2020-21) to the engines, and in testnet or
    live their orders go to Binance: real orders sized and timed on old prices. The Orchestrator refuses
    it again; this answers before anything starts, as a config error.
    """
    if args.replay is not None and settings.trading_mode != "paper":
        return [f"TRADING_MODE={settings.trading_mode}: --replay trades on recorded prices and runs only "
                "with TRADING_MODE=paper"]
    return []


def check_config(settings: Settings) -> int:
    width = max(len(name) for name in settings.masked())
    for name, value in settings.masked().items():
        print(f"{name.upper():<{width}}  {value}")
    print("configuration OK")
    return 0


def secrets_of(settings: Settings) -> list[str]:
    out = []
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            out.append(value.get_secret_value())
    return out


async def run_daemon(settings: Settings, args: argparse.Namespace) -> int:
    import structlog

    from engines.orchestrator import Orchestrator, StartupAborted, StartupError

    log = structlog.get_logger("main")
    loop = asyncio.get_running_loop()
    replay = Path(args.replay) if args.replay is not None else None
    orch = Orchestrator(settings, LiveClock(), replay_path=replay, speed=args.speed)
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.warning("signal received: stopping gracefully (send again to exit at once)", signal=name)
            orch.request_stop(name)
        else:
            log.error("second signal: exiting at once", signal=name)
            os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await orch.run()
    except StartupAborted as exc:
        log.warning(f"start-up interrupted: {exc}")
        return 0
    except StartupError as exc:
        hint = "" if replay is not None or settings.trading_mode != "paper" else (
            " — to run offline on the bundled market data: python main.py --replay"
        )
        log.error(f"start-up failed: {exc}{hint}")
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if orch.crashed:
        log.error("stopped after an internal failure; exiting 1 so the service manager restarts us")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Only the default .env may be absent; a file named on the command line must be there.
        settings = load_settings(env_file=DEFAULT_ENV_FILE if args.env_file is None else args.env_file,
                                 env_file_required=args.env_file is not None)
        problems = mode_problems(settings, args)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        return check_config(settings)

    from monitoring.logging import configure_logging

    configure_logging(settings.log_format, settings.log_level, secrets_of(settings))
    import structlog

    try:
        return asyncio.run(run_daemon(settings, args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        structlog.get_logger("main").critical("crashed", error=repr(exc), exc_info=exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
