"""Error kinds, sorted by what to do about them (DESIGN.md: "Errors are sorted by what to do").

ccxt exceptions are translated into these in `exchange/` and nowhere else, so engines and the
supervisor decide by kind, never by parsing an exchange's message.
"""

from __future__ import annotations


class KineticError(Exception):
    """Base of the project's own errors."""


class TemporaryError(KineticError):
    """Timeout, rate limit, 5xx, disconnect: retry with jittered backoff."""


class DependencyError(KineticError):
    """One symbol's or one order's problem (bad data, an order the exchange refused): skip it this tick."""


class OrderRejected(DependencyError):
    """The exchange refused this order; the intent is dropped and the reservation released."""


class InsufficientFunds(OrderRejected):
    """Not enough balance for this order."""


class OrderNotFound(DependencyError):
    """The exchange does not know this client order id."""


class OperationalError(KineticError):
    """Bad keys, account-wide lack of funds, a market that disappeared: halt the engine and alert."""


class InvariantError(KineticError):
    """Something that must never happen did. Crash; the supervisor or systemd restarts from the ledger."""


class ConfigError(KineticError):
    """Settings are invalid. Carries one line per problem; main exits 78 (EX_CONFIG) without a traceback."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class LedgerVersionError(KineticError):
    """The ledger file was written by a newer version of the program; refusing to open it."""
