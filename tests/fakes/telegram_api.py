"""A loopback fake of the Telegram Bot API, good enough for the real python-telegram-bot to talk to.

Tests drive the daemon's bot exactly as a phone would: they inject updates (commands, button presses)
that the bot long-polls with getUpdates, and read back what the bot sent. Faults are injected per
method (429 with retry_after, 502, slow answers) or by stopping the server, so the bot's behaviour
when Telegram misbehaves is tested without the internet.

Waiting here goes through a `Clock` (a `LiveClock` by default): the fake is a network peer, so its
long-poll and slow answers run on real time even when the code under test uses a `SimClock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from core.clock import Clock, LiveClock

BOT_ID = 777_000
BOT_USERNAME = "kinetic_test_bot"
TOKEN = "123456:TEST-token-for-the-loopback-fake"

# Parameters that PTB sends JSON-encoded inside a form body.
_JSON_PARAMS = {"reply_markup", "entities", "allowed_updates", "commands", "scope", "reply_parameters"}
_NOT_FOUND = object()
_INT_PARAMS = {"chat_id", "message_id", "offset", "limit", "timeout", "user_id"}


@dataclass(slots=True)
class Call:
    """One request the bot made: which method, with which parameters, when (fake's clock), and the
    HTTP status it got (0 while still being answered)."""

    method: str
    params: dict[str, Any]
    at: float
    status: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(slots=True)
class Fault:
    """What to do instead of answering normally, for the next `count` calls of a method."""

    status: int
    retry_after: int | None = None
    delay: float = 0.0
    description: str = ""
    count: int = 1


@dataclass(slots=True)
class _Chat:
    next_message_id: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class FakeBotApi:
    """aiohttp server on 127.0.0.1 (random port) answering POST /bot<TOKEN>/<method>."""

    def __init__(self, token: str = TOKEN, clock: Clock | None = None, poll_wait: float = 0.05) -> None:
        self.token = token
        self.clock: Clock = clock or LiveClock()
        self.poll_wait = poll_wait
        self.calls: list[Call] = []
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._ids = itertools.count(10_000)
        self._chats: dict[int, _Chat] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._slow: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._new_update = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1; `port` lets a test bring the server back where it was."""
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port or 0)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop answering: connections are then refused (Telegram unreachable)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """What the bot takes as `base_url` (PTB appends `/bot<TOKEN>`)."""
        return f"http://127.0.0.1:{self.port}"

    # --- what the test injects ---------------------------------------------------------------
    def inject_command(
        self, text: str, *, chat_id: int, user_id: int, username: str = "someone", edited: bool = False
    ) -> int:
        """A message starting with a bot command, as a user would send it; returns the update id."""
        command = text.split()[0]
        message = {
            "message_id": next(self._ids),
            "date": int(self.clock.now()),
            "chat": self._chat_json(chat_id),
            "from": {"id": user_id, "is_bot": False, "first_name": username, "username": username},
            "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(command)}],
        }
        return self._push({"edited_message" if edited else "message": message})

    def inject_callback(self, data: str, *, chat_id: int, user_id: int, message_id: int) -> int:
        """A press on an inline keyboard button under the bot's message `message_id`."""
        message = {
            "message_id": message_id,
            "date": int(self.clock.now()),
            "chat": self._chat_json(chat_id),
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Kinetic", "username": BOT_USERNAME},
            "text": "(bot message)",
        }
        query = {
            "id": str(next(self._ids)),
            "from": {"id": user_id, "is_bot": False, "first_name": "presser"},
            "chat_instance": f"ci{chat_id}",
            "data": data,
            "message": message,
        }
        return self._push({"callback_query": query})

    def fail(
        self,
        method: str,
        status: int,
        *,
        retry_after: int | None = None,
        count: int = 1,
        delay: float = 0.0,
        description: str = "",
    ) -> None:
        """The next `count` calls of `method` answer `status` (429 carries retry_after)."""
        self._faults.setdefault(method, []).append(
            Fault(status, retry_after, delay, description or f"injected {status}", count)
        )

    def slow(self, method: str, seconds: float) -> None:
        """Every call of `method` answers only after `seconds` (0 to undo)."""
        if seconds > 0:
            self._slow[method] = seconds
        else:
            self._slow.pop(method, None)

    # --- what the test reads back ------------------------------------------------------------
    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def sent(self, chat_id: int | None = None) -> list[str]:
        """Texts of every sendMessage that was answered ok, optionally for one chat."""
        return [
            str(c.params.get("text", ""))
            for c in self.calls
            if c.method == "sendMessage"
            and c.ok
            and (chat_id is None or c.params.get("chat_id") == chat_id)
        ]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until `predicate()` holds; re-checked after every request the fake answers."""

        async def _loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await self.clock.wait_for(_loop(), timeout)

    async def wait_sent(self, chat_id: int, count: int = 1, timeout: float = 5.0) -> list[str]:
        await self.wait_until(lambda: len(self.sent(chat_id)) >= count, timeout)
        return self.sent(chat_id)

    # --- the server ----------------------------------------------------------------------------
    def _push(self, body: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        self._updates.append({"update_id": update_id, **body})
        self._new_update.set()
        return update_id

    def _chat_json(self, chat_id: int) -> dict[str, Any]:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": "op"}
        return {"id": chat_id, "type": "supergroup" if chat_id < -1_000_000_000_000 else "group",
                "title": "ops"}

    def _bot_message(self, chat_id: int, text: str, reply_markup: Any = None) -> dict[str, Any]:
        chat = self._chats.setdefault(chat_id, _Chat())
        msg: dict[str, Any] = {
            "message_id": next(chat.next_message_id),
            "date": int(self.clock.now()),
            "chat": self._chat_json(chat_id),
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Kinetic", "username": BOT_USERNAME},
            "text": text,
        }
        if reply_markup:
            msg["reply_markup"] = reply_markup
        return msg

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            raw: dict[str, Any] = await request.json()
        else:
            raw = dict(await request.post())
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and key in _JSON_PARAMS:
                value = json.loads(value)
            elif isinstance(value, str) and key in _INT_PARAMS:
                value = int(value)
            params[key] = value
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"},
                                     status=401)
        params = await self._params(request)
        call = Call(method, params, self.clock.now())
        self.calls.append(call)
        try:
            if method in self._slow:
                await self.clock.sleep(self._slow[method])
            fault = self._take_fault(method)
            if fault is not None:
                if fault.delay:
                    await self.clock.sleep(fault.delay)
                call.status = fault.status
                return self._fault_response(fault)
            result = await self._answer(method, params)
            if result is _NOT_FOUND:
                call.status = 404
                return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"},
                                         status=404)
            call.status = 200
            return web.json_response({"ok": True, "result": result})
        finally:
            self._changed.set()

    def _take_fault(self, method: str) -> Fault | None:
        queue = self._faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        fault.count -= 1
        if fault.count <= 0:
            queue.pop(0)
        return fault

    @staticmethod
    def _fault_response(fault: Fault) -> web.Response:
        if fault.status >= 500:
            return web.Response(status=fault.status, text="Bad Gateway")
        body: dict[str, Any] = {"ok": False, "error_code": fault.status, "description": fault.description}
        if fault.retry_after is not None:
            body["parameters"] = {"retry_after": fault.retry_after}
            body["description"] = f"Too Many Requests: retry after {fault.retry_after}"
        return web.json_response(body, status=fault.status)

    async def _answer(self, method: str, params: dict[str, Any]) -> Any:
        if method == "getMe":
            return {"id": BOT_ID, "is_bot": True, "first_name": "Kinetic", "username": BOT_USERNAME,
                    "can_join_groups": True, "can_read_all_group_messages": False,
                    "supports_inline_queries": False}
        if method == "deleteWebhook":
            if str(params.get("drop_pending_updates", "")).lower() in ("true", "1"):
                self._updates.clear()
            return True
        if method in ("setMyCommands", "answerCallbackQuery", "deleteMyCommands"):
            return True
        if method == "getUpdates":
            return await self._get_updates(params)
        if method == "sendMessage":
            return self._bot_message(int(params["chat_id"]), str(params.get("text", "")),
                                     params.get("reply_markup"))
        if method in ("editMessageText", "editMessageReplyMarkup"):
            msg = self._bot_message(int(params["chat_id"]), str(params.get("text", "(edited)")),
                                    params.get("reply_markup"))
            msg["message_id"] = int(params["message_id"])
            return msg
        return _NOT_FOUND

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates and int(params.get("timeout") or 0) > 0:
            # Long poll, but bounded short so tests never wait on an idle fake.
            self._new_update.clear()
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(self._new_update.wait(), self.poll_wait)
        return list(self._updates[:100])
