"""Logging for the daemon: structlog everywhere, stdlib loggers (ccxt, telegram, aiohttp) routed through
the same processors, console lines on a terminal and JSON lines otherwise (journald, files).

Secrets never print: every event is scrubbed of the configured secret values and of anything that
looks like a Telegram bot token or a Binance signature before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_TOKEN_RE = re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b")
_SIGNATURE_RE = re.compile(r"(signature=)[0-9a-fA-F]{16,}")
_MASK = "***"


class SecretScrubber:
    """A structlog processor that replaces known secret values wherever they appear in an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        # Each pattern needs its literal part to match at all; the substring test is far cheaper than
        # a regex pass, and most values (symbols, amounts, ids) contain neither.
        if ":" in text:
            text = _TOKEN_RE.sub(_MASK, text)
        if "signature=" in text:
            text = _SIGNATURE_RE.sub(r"\1" + _MASK, text)
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(repr(value))
        return value

    def __call__(self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self._clean(event_dict[key])
        return event_dict


class _ScrubExceptionText:
    """Runs after exceptions are rendered to text, so tracebacks are scrubbed too."""

    def __init__(self, scrubber: SecretScrubber) -> None:
        self._scrubber = scrubber

    def __call__(self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        exc = event_dict.get("exception")
        if isinstance(exc, str):
            event_dict["exception"] = self._scrubber.scrub(exc)
        return event_dict


class _ScrubRendered:
    """Last in the chain: whatever a renderer produced (tracebacks included) is scrubbed once more."""

    def __init__(self, scrubber: SecretScrubber) -> None:
        self._scrubber = scrubber

    def __call__(self, _logger: Any, _name: str, rendered: Any) -> Any:
        return self._scrubber.scrub(rendered) if isinstance(rendered, str) else rendered


def use_json(log_format: str, stream: Any = None) -> bool:
    if log_format == "json":
        return True
    if log_format == "console":
        return False
    stream = stream if stream is not None else sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure_logging(
    log_format: str = "auto", level: str = "INFO", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    """Install one pipeline for structlog and the stdlib; safe to call more than once (tests do)."""
    stream = stream if stream is not None else sys.stderr
    scrubber = SecretScrubber(secrets)
    as_json = use_json(log_format, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrubber,
    ]
    renderer: Any
    if as_json:
        final: list[Any] = [
            structlog.processors.format_exc_info,
            _ScrubExceptionText(scrubber),
            structlog.processors.JSONRenderer(default=str),
        ]
        renderer = final
    else:
        # Plain tracebacks: rich's show_locals would print local variables (keys) unscrubbed.
        renderer = [
            structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty(),
                                          exception_formatter=structlog.dev.plain_traceback),
        ]
    structlog.configure(
        # Level first: a line below the level (a debug line in the order path) is dropped before the
        # timestamp, the scrubber's regexes and the rest of the chain run for nothing.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer,
                    _ScrubRendered(scrubber)],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries: keep their warnings, drop their debug noise.
    for name in ("ccxt", "telegram", "httpx", "httpcore", "aiohttp", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))
