"""The Telegram bot: commands from the operators' phones, answered inside the daemon's event loop.

The bot knows the daemon only through `monitoring.control.Control`. A command counts only when the
sender's user id is allowed AND it arrives in a configured chat: a group that contains the bot is not
an authorization, nor is a known person writing from an unknown chat. Everything else gets no reply
at all (a reply would confirm to a stranger that the bot is listening), is logged with chat and user
id, and, like every command, is published as `CommandReceived` so the journal records who asked.

Telegram is an accessory to trading, never a dependency: every request has a timeout, and if the API
is unreachable at start-up `start()` logs once and keeps retrying in the background instead of
raising, so the daemon trades on and the bot comes up when Telegram does.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pydantic import SecretStr
from telegram import BotCommand, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from core.clock import Clock
from core.events import CommandReceived, EventBus
from core.values import value_type
from monitoring.alerts import (
    TELEGRAM_MAX_CHARS,
    format_balances,
    format_breaker,
    format_pnl,
    format_positions,
    format_status,
    format_trades,
    split_message,
)
from monitoring.control import ENGINE_TARGETS, CommandResult, Control

if TYPE_CHECKING:
    from config import Settings

log = structlog.get_logger("telegram")

T = TypeVar("T")

KILL_CONFIRM_SECONDS = 60.0
ENGINES = ("spot", "futures")
MAX_PNL_DAYS = 365
MAX_TRADES = 100

# (command, usage line, menu description). The usage line is what a wrong or missing argument gets.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("status", "/status", "trading state, engines, equity, day P&L, drawdown"),
    ("positions", "/positions", "open positions"),
    ("balance", "/balance", "balances per engine"),
    ("pnl", "/pnl [days]", f"realized P&L per day and engine (default 7, max {MAX_PNL_DAYS})"),
    ("trades", "/trades [n]", f"last n trades (default 10, max {MAX_TRADES})"),
    ("pause", "/pause <spot|futures|all>", "stop opening positions"),
    ("resume", "/resume <spot|futures|all>", "resume a paused engine"),
    ("restart", "/restart <spot|futures>", "restart an engine"),
    ("breaker", "/breaker [reset]", "circuit breaker state, or reset it"),
    ("kill", "/kill", "halt ALL trading (asks to confirm)"),
    ("help", "/help", "this list"),
)
USAGE = {name: f"Usage: {usage} — {desc}" for name, usage, desc in COMMANDS}

HandlerFn = Callable[[int, int, list[str]], Awaitable[str | None]]


@value_type
class _PendingKill:
    chat_id: int
    user_id: int
    expires_at: float


class _Usage(Exception):
    """Raised by a command when its arguments are wrong; answered with the usage line."""


def _help_text() -> str:
    return "Commands:\n" + "\n".join(f"{usage} — {desc}" for _, usage, desc in COMMANDS)


def _result_text(result: CommandResult) -> str:
    return f"{'✅' if result.ok else '❌'} {result.message}"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _int_arg(args: list[str], default: int, low: int, high: int) -> int:
    if not args:
        return default
    if len(args) != 1 or not args[0].isdigit():
        raise _Usage
    value = int(args[0])
    if not low <= value <= high:
        raise _Usage
    return value


def _one_of(args: list[str], choices: Sequence[str]) -> str:
    if len(args) != 1 or args[0].lower() not in choices:
        raise _Usage
    return args[0].lower()


class TelegramBot:
    """python-telegram-bot's Application, started and stopped inside the daemon's own event loop."""

    def __init__(
        self,
        token: SecretStr | str,
        chat_ids: Sequence[int],
        allowed_user_ids: Sequence[int],
        control: Control,
        clock: Clock,
        bus: EventBus,
        base_url: str | None = None,
        *,
        request_timeout: float = 10.0,
        poll_timeout: float = 10.0,
        start_timeout: float = 30.0,
        control_timeout: float = 20.0,
        retry_start_seconds: float = 15.0,
        retry_start_max_seconds: float = 300.0,
    ) -> None:
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self._chat_ids = frozenset(chat_ids)
        self._allowed_users = frozenset(allowed_user_ids)
        self._control = control
        self._clock = clock
        self._bus = bus
        self._base_url = base_url.rstrip("/") if base_url else None
        self._request_timeout = request_timeout
        self._poll_timeout = poll_timeout
        self._start_timeout = start_timeout
        self._control_timeout = control_timeout
        self._retry_start = retry_start_seconds
        self._retry_start_max = retry_start_max_seconds
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._connected = False
        self._connect_task: asyncio.Task[None] | None = None
        self._pending_kills: dict[str, _PendingKill] = {}
        self._poll_errors = 0
        self._handlers: dict[str, HandlerFn] = {
            "status": self._cmd_status,
            "positions": self._cmd_positions,
            "balance": self._cmd_balance,
            "pnl": self._cmd_pnl,
            "trades": self._cmd_trades,
            "pause": self._cmd_pause,
            "resume": self._cmd_resume,
            "restart": self._cmd_restart,
            "breaker": self._cmd_breaker,
            "kill": self._cmd_kill,
            "help": self._cmd_help,
            "start": self._cmd_help,  # what a Telegram client sends when a user first opens the bot
        }

    @classmethod
    def from_settings(
        cls, settings: Settings, control: Control, clock: Clock, bus: EventBus, base_url: str | None = None
    ) -> TelegramBot:
        """The bot as configured; only call it when TELEGRAM_BOT_TOKEN is set (Telegram is optional)."""
        if settings.telegram_bot_token is None:
            raise ValueError("TELEGRAM_BOT_TOKEN is not set")
        return cls(settings.telegram_bot_token, settings.telegram_chat_ids, settings.telegram_allowed_user_ids,
                   control, clock, bus, base_url)

    @property
    def connected(self) -> bool:
        """True while polling for commands; False before start, while retrying, after stop."""
        return self._connected

    # --- lifecycle ---------------------------------------------------------------------------
    def _build(self) -> Application[Any, Any, Any, Any, Any, Any]:
        builder = (
            ApplicationBuilder()
            .token(self._token.get_secret_value())
            .connect_timeout(self._request_timeout)
            .read_timeout(self._request_timeout)
            .write_timeout(self._request_timeout)
            .pool_timeout(self._request_timeout)
            .get_updates_connect_timeout(self._request_timeout)
            .get_updates_read_timeout(self._request_timeout)
            .get_updates_write_timeout(self._request_timeout)
            .get_updates_pool_timeout(self._request_timeout)
        )
        if self._base_url:
            builder = builder.base_url(f"{self._base_url}/bot").base_file_url(f"{self._base_url}/file/bot")
        app = builder.build()
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.COMMAND, self._on_command))
        app.add_handler(CallbackQueryHandler(self._on_callback))
        app.add_error_handler(self._on_handler_error)
        return app

    async def start(self) -> bool:
        """Connect and start polling. Never raises (bar cancellation): returns False when Telegram is
        unreachable, after logging why, and keeps retrying in the background until stop()."""
        if self._app is not None or self._connect_task is not None:
            return self._connected
        try:
            await self._connect_once()
            return True
        except asyncio.CancelledError:
            raise
        except InvalidToken:
            log.error("telegram rejected the bot token; Telegram commands and alerts are off "
                      "(check TELEGRAM_BOT_TOKEN)")
            return False
        except Exception as exc:
            log.error("telegram unreachable at start-up; the daemon runs on and retries in the background",
                      error=_error_text(exc), retry_in=self._retry_start)
            self._connect_task = asyncio.create_task(self._keep_connecting(), name="telegram-connect")
            return False

    async def _connect_once(self) -> None:
        app = self._build()
        self._app = app
        try:
            await self._clock.wait_for(self._bring_up(app), self._start_timeout)
        except BaseException:
            await self._tear_down()
            raise

    async def _bring_up(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        await app.initialize()
        await app.start()
        assert app.updater is not None
        # Pending updates are dropped: a /kill typed while the daemon was down must not fire on boot.
        await app.updater.start_polling(
            timeout=int(self._poll_timeout),
            allowed_updates=["message", "callback_query"],
            drop_pending_updates=True,
            error_callback=self._on_poll_error,
        )
        try:
            await app.bot.set_my_commands([BotCommand(name, desc) for name, _, desc in COMMANDS])
        except TelegramError as exc:
            log.warning("telegram command menu not registered", error=_error_text(exc))
        self._connected = True
        self._poll_errors = 0
        log.info("telegram started", bot=app.bot.username, chats=len(self._chat_ids),
                 users=len(self._allowed_users))

    async def _keep_connecting(self) -> None:
        delay = self._retry_start
        attempt = 1
        while True:
            await self._clock.sleep(delay)
            attempt += 1
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except InvalidToken:
                log.error("telegram rejected the bot token; giving up (check TELEGRAM_BOT_TOKEN)")
                return
            except Exception as exc:
                delay = min(self._retry_start_max, delay * 2)
                log.warning("telegram still unreachable", attempt=attempt, error=_error_text(exc),
                            retry_in=delay)
                continue
            log.info("telegram reachable again", attempt=attempt)
            return

    async def stop(self) -> None:
        """Stop polling and close connections, in reverse order of start; never raises."""
        task, self._connect_task = self._connect_task, None
        if task is not None:
            task.cancel()
            # asyncio.wait, not `await task` under suppress(CancelledError): the task's own cancellation
            # is expected, but a cancellation of stop() itself must still reach its caller.
            await asyncio.wait({task})
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                log.warning("telegram connect task had failed", error=_error_text(failure))
        await self._tear_down()
        log.info("telegram stopped")

    async def _tear_down(self) -> None:
        app, self._app = self._app, None
        self._connected = False
        if app is None:
            return
        if app.updater is not None and app.updater.running:
            await self._bounded_step("updater.stop", app.updater.stop())
        if app.running:
            await self._bounded_step("app.stop", app.stop())
        await self._bounded_step("app.shutdown", app.shutdown())

    async def _bounded_step(self, name: str, step: Awaitable[None]) -> None:
        try:
            await self._clock.wait_for(step, self._request_timeout + 5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("telegram shutdown step failed", step=name, error=_error_text(exc))

    def _on_poll_error(self, exc: TelegramError) -> None:
        # PTB retries polling by itself with backoff; log the first failure of an outage, then rarely.
        self._poll_errors += 1
        if self._poll_errors == 1 or self._poll_errors % 50 == 0:
            log.warning("telegram polling failing", errors=self._poll_errors, error=_error_text(exc))

    async def _on_handler_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram handler error", error=_error_text(context.error) if context.error else None)

    # --- sending (also what AlertSender uses) ------------------------------------------------
    async def send_message(self, chat_id: int, text: str) -> None:
        """Send one plain-text message. Raises TelegramError (RetryAfter included) for the caller to
        handle; AlertSender paces, retries and counts."""
        app = self._app
        if app is None or not self._connected:
            raise NetworkError("Telegram is not connected")
        await app.bot.send_message(chat_id=chat_id, text=text)

    async def _reply(self, chat_id: int, text: str, markup: InlineKeyboardMarkup | None = None) -> int | None:
        """Answer a command; a failed answer is logged, never raised (the command already ran)."""
        app = self._app
        if app is None:
            return None
        message_id: int | None = None
        for part in split_message(text.split("\n"), TELEGRAM_MAX_CHARS):
            try:
                msg = await app.bot.send_message(chat_id=chat_id, text=part, reply_markup=markup)
                message_id = msg.message_id
            except TelegramError as exc:
                log.warning("telegram reply failed", chat_id=chat_id, error=_error_text(exc))
                return None
        return message_id

    # --- authorization -----------------------------------------------------------------------
    def _authorized(self, chat_id: int, user_id: int) -> bool:
        return user_id in self._allowed_users and chat_id in self._chat_ids

    def _record(self, command: str, args: str, chat_id: int, user_id: int, authorized: bool) -> None:
        self._bus.publish(
            CommandReceived(
                ts=self._clock.now(),
                command=command,
                args=args,
                chat_id=chat_id,
                user_id=user_id,
                authorized=authorized,
            )
        )
        if not authorized:
            log.warning("telegram command from unauthorized sender ignored", command=command,
                        chat_id=chat_id, user_id=user_id)
        else:
            log.info("telegram command", command=command, args=args, chat_id=chat_id, user_id=user_id)

    # --- commands ----------------------------------------------------------------------------
    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.text is None:
            return
        head, *args = message.text.split()
        name, _, addressee = head[1:].partition("@")
        app = self._app
        if addressee and app is not None and addressee.lower() != (app.bot.username or "").lower():
            return  # "/status@OtherBot" in a group is not for us
        name = name.lower()
        chat_id = message.chat.id
        user_id = update.effective_user.id if update.effective_user else 0
        authorized = self._authorized(chat_id, user_id)
        self._record(name, " ".join(args), chat_id, user_id, authorized)
        if not authorized:
            return
        handler = self._handlers.get(name)
        if handler is None:
            await self._reply(chat_id, f"Unknown command /{name}. Send /help for the list.")
            return
        try:
            text = await handler(chat_id, user_id, args)
        except _Usage:
            text = USAGE[name]
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.error("telegram command timed out", command=name, timeout=self._control_timeout)
            text = f"⚠️ /{name} timed out after {self._control_timeout:g}s; the daemon may be busy."
        except Exception as exc:
            log.exception("telegram command failed", command=name)
            text = f"⚠️ /{name} failed: {_error_text(exc)}"
        if text:
            await self._reply(chat_id, text)

    async def _ask(self, aw: Awaitable[T]) -> T:
        """Every Control call is bounded: a stuck daemon answers 'timed out', not silence forever."""
        return await self._clock.wait_for(aw, self._control_timeout)

    @staticmethod
    def _by(user_id: int) -> str:
        return f"telegram:{user_id}"

    @staticmethod
    def _no_args(args: list[str]) -> None:
        if args:
            raise _Usage

    async def _cmd_help(self, chat_id: int, user_id: int, args: list[str]) -> str:
        return _help_text()

    async def _cmd_status(self, chat_id: int, user_id: int, args: list[str]) -> str:
        self._no_args(args)
        return format_status(await self._ask(self._control.status()))

    async def _cmd_positions(self, chat_id: int, user_id: int, args: list[str]) -> str:
        self._no_args(args)
        return format_positions(await self._ask(self._control.positions()), self._clock.now())

    async def _cmd_balance(self, chat_id: int, user_id: int, args: list[str]) -> str:
        self._no_args(args)
        return format_balances(await self._ask(self._control.balance()))

    async def _cmd_pnl(self, chat_id: int, user_id: int, args: list[str]) -> str:
        days = _int_arg(args, 7, 1, MAX_PNL_DAYS)
        return format_pnl(await self._ask(self._control.pnl(days)), days)

    async def _cmd_trades(self, chat_id: int, user_id: int, args: list[str]) -> str:
        n = _int_arg(args, 10, 1, MAX_TRADES)
        return format_trades(await self._ask(self._control.trades(n)))

    async def _cmd_pause(self, chat_id: int, user_id: int, args: list[str]) -> str:
        target = _one_of(args, ENGINE_TARGETS)
        return _result_text(await self._ask(self._control.pause(target, by=self._by(user_id))))

    async def _cmd_resume(self, chat_id: int, user_id: int, args: list[str]) -> str:
        target = _one_of(args, ENGINE_TARGETS)
        return _result_text(await self._ask(self._control.resume(target, by=self._by(user_id))))

    async def _cmd_restart(self, chat_id: int, user_id: int, args: list[str]) -> str:
        engine = _one_of(args, ENGINES)
        return _result_text(await self._ask(self._control.restart(engine, by=self._by(user_id))))

    async def _cmd_breaker(self, chat_id: int, user_id: int, args: list[str]) -> str:
        if not args:
            return format_breaker(await self._ask(self._control.breaker()))
        _one_of(args, ("reset",))
        return _result_text(await self._ask(self._control.breaker_reset(by=self._by(user_id))))

    async def _cmd_kill(self, chat_id: int, user_id: int, args: list[str]) -> None:
        self._no_args(args)
        now = self._clock.now()
        self._pending_kills = {n: p for n, p in self._pending_kills.items() if p.expires_at >= now}
        nonce = secrets.token_hex(8)
        self._pending_kills[nonce] = _PendingKill(chat_id, user_id, now + KILL_CONFIRM_SECONDS)
        markup = InlineKeyboardMarkup(
            [[
                InlineKeyboardButton("🛑 Confirm kill", callback_data=f"kill:{nonce}"),
                InlineKeyboardButton("Cancel", callback_data=f"cancel:{nonce}"),
            ]]
        )
        await self._reply(
            chat_id,
            "⚠️ Kill switch: halts ALL trading (only the system's own flattening passes) until a "
            f"person resumes it.\nConfirm within {KILL_CONFIRM_SECONDS:g} s.",
            markup,
        )
        return None

    # --- kill confirmation -------------------------------------------------------------------
    async def _on_callback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        data = query.data if isinstance(query.data, str) else ""
        action, _, nonce = data.partition(":")
        chat_id = query.message.chat.id if query.message is not None else 0
        user_id = query.from_user.id
        authorized = self._authorized(chat_id, user_id)
        command = {"kill": "kill-confirm", "cancel": "kill-cancel"}.get(action, "button")
        self._record(command, data, chat_id, user_id, authorized)
        if not authorized:
            return
        pending = self._pending_kills.get(nonce)
        if action not in ("kill", "cancel") or pending is None or pending.chat_id != chat_id:
            await self._answer(query.id, "This confirmation is not valid here (unknown, already used or "
                                         "from another chat). Nothing was done.")
            return
        del self._pending_kills[nonce]  # one press, one decision: a double tap cannot kill twice
        message_id = query.message.message_id if query.message is not None else None
        if self._clock.now() > pending.expires_at:
            await self._answer(query.id, "Confirmation expired. Nothing was done; send /kill again.")
            await self._edit(chat_id, message_id, "Kill request expired — nothing was done.")
            return
        if action == "cancel":
            await self._answer(query.id, "Kill cancelled.")
            await self._edit(chat_id, message_id, f"Kill cancelled by {user_id}.")
            return
        await self._answer(query.id, "Engaging kill switch…")
        await self._edit(chat_id, message_id, f"Kill confirmed by {user_id}.")
        try:
            result = await self._ask(self._control.kill(by=self._by(user_id)))
            text = f"🛑 Kill switch: {_result_text(result)}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("kill failed")
            text = f"⚠️ Kill FAILED: {_error_text(exc)}. Try /kill again or stop the daemon."
        await self._reply(chat_id, text)

    async def _answer(self, query_id: str, text: str) -> None:
        app = self._app
        if app is None:
            return
        try:
            await app.bot.answer_callback_query(query_id, text=text, show_alert=True)
        except TelegramError as exc:
            log.warning("telegram callback answer failed", error=_error_text(exc))

    async def _edit(self, chat_id: int, message_id: int | None, text: str) -> None:
        """Replace the confirmation message (and drop its buttons) so it cannot be pressed again."""
        app = self._app
        if app is None or message_id is None:
            return
        try:
            await app.bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
        except TelegramError as exc:
            log.warning("telegram edit failed", error=_error_text(exc))

