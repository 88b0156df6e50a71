"""ccxt exceptions translated into the project's error kinds (core/errors.py), here and nowhere else.

Callers decide by kind, never by parsing an exchange message: retry a TemporaryError, skip a
DependencyError for this tick, halt the engine on an OperationalError. A few subclasses carry the
distinctions that change what the order path must do:

- `SendOutcomeUnknown`: an order was sent and no clear answer came back (timeout, dropped connection,
  5xx). It may exist. Never send it again; ask for it by client order id.
- `DuplicateClientOrderId`: the exchange already has an order with this client id, i.e. an earlier
  send did arrive. The client answers it by fetching that order.
- `ClockSkew`: the request's timestamp was outside recvWindow; retrying is useful only after the
  clock offset has been measured again.

Messages keep the exchange's words (code and text) but never a key, a secret or a signature.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import aiohttp
import ccxt.async_support as ccxt

from core.errors import (
    DependencyError,
    InsufficientFunds,
    KineticError,
    OperationalError,
    OrderNotFound,
    OrderRejected,
    TemporaryError,
)


class SendOutcomeUnknown(TemporaryError):
    """An order send with no clear answer: the order may or may not exist. Resolve it by client order
    id (fetch_order), never by sending again."""


class RateLimited(TemporaryError):
    """HTTP 429/418 or Binance -1003: the request was refused before it did anything."""


class ClockSkew(TemporaryError):
    """Binance -1021: our timestamp was outside recvWindow; nothing was done. Resync, then retry."""


class MalformedResponse(TemporaryError):
    """A 200 answer that is not what the endpoint returns (an HTML error page, missing fields)."""


class DuplicateClientOrderId(OrderRejected):
    """The exchange already holds an order with this client order id: an earlier send arrived."""


_CODE = re.compile(r'"code"\s*:\s*"?(-?\d+)')
_SIGNATURE = re.compile(r"(signature=)[0-9a-fA-F]+")
_DUPLICATE_TEXT = ("Duplicate order sent", "ClientOrderId is duplicated")

# Futures-only Binance codes. ccxt maps them through a table it picks by matching the request URL
# against Binance's real hosts, so on a loopback (or any proxied) URL they arrive as a bare
# ExchangeError. Mapping them here gives the same kinds wherever the client points.
_FUTURES_CODES: dict[int, type[KineticError]] = {
    -2019: InsufficientFunds,  # Margin is insufficient.
    -2018: InsufficientFunds,  # Balance is insufficient.
    -4116: DuplicateClientOrderId,  # ClientOrderId is duplicated.
    -2021: OrderRejected,  # Order would immediately trigger.
    -2022: OrderRejected,  # ReduceOnly Order is rejected.
    -4003: OrderRejected,  # Quantity less than or equal to zero.
    -4164: OrderRejected,  # Order's notional must be no smaller than ...
    -4120: OrderRejected,  # Order type not supported for this endpoint (use the algo endpoints).
    -1111: OrderRejected,  # Precision is over the maximum defined for this asset.
    -1013: OrderRejected,  # Filter failure.
}


def error_code(exc: BaseException) -> int | None:
    """The Binance error code inside a ccxt message (`binance {"code":-2010,"msg":...}`), if any."""
    match = _CODE.search(str(exc))
    return int(match.group(1)) if match else None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove signatures and any of `secrets` from a message before it reaches a log or an alert."""
    text = _SIGNATURE.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def is_duplicate_order(exc: BaseException) -> bool:
    if isinstance(exc, ccxt.DuplicateOrderId | DuplicateClientOrderId):
        return True
    message = str(exc)
    return error_code(exc) == -4116 or any(t in message for t in _DUPLICATE_TEXT)


def is_transport_failure(exc: BaseException) -> bool:
    """A request that failed on the wire (connection reset mid-answer, broken payload): ccxt raises a
    bare ExchangeError for aiohttp errors that are not connection errors."""
    return isinstance(exc, ccxt.ExchangeError) and isinstance(exc.__cause__, aiohttp.ClientError)


def translate(exc: Exception, *, secrets: Iterable[str] = ()) -> KineticError:
    """Map one ccxt exception (or a timeout) to the kind that says what to do about it."""
    if isinstance(exc, KineticError):
        return exc
    message = redact(f"{type(exc).__name__}: {exc}", secrets)
    kind = _kind(exc)
    return kind(message)


def _kind(exc: Exception) -> type[KineticError]:
    if isinstance(exc, TimeoutError):
        return TemporaryError
    if not isinstance(exc, ccxt.BaseError):
        return DependencyError
    # Temporary: nothing was decided, the same request can succeed later.
    if isinstance(exc, ccxt.InvalidNonce):
        return ClockSkew
    if isinstance(exc, ccxt.DDoSProtection | ccxt.RateLimitExceeded):
        return RateLimited
    if isinstance(exc, ccxt.BadResponse):
        return MalformedResponse
    if isinstance(exc, ccxt.OperationFailed):  # NetworkError, RequestTimeout, ExchangeNotAvailable, ...
        return TemporaryError
    if is_transport_failure(exc):
        return TemporaryError
    # Account-wide: bad keys, missing permissions, a suspended or restricted account.
    if isinstance(exc, ccxt.AuthenticationError | ccxt.RestrictedLocation):
        return OperationalError
    # One order's or one symbol's problem.
    if isinstance(exc, ccxt.OrderNotFound):
        return OrderNotFound
    if is_duplicate_order(exc):
        return DuplicateClientOrderId
    if isinstance(exc, ccxt.InsufficientFunds):
        return InsufficientFunds
    if isinstance(exc, ccxt.InvalidOrder | ccxt.OperationRejected):
        return OrderRejected
    code = error_code(exc)
    if code is not None and code in _FUTURES_CODES:
        return _FUTURES_CODES[code]
    if code == -1003:
        return RateLimited
    return DependencyError
