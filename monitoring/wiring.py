"""Builds the optional operational hooks the Orchestrator calls (Telegram, systemd notify).

Lives in `monitoring` so that `engines` never imports Telegram or systemd code, and `main` only
asks for a dict of callables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from config import Settings


def build_hooks(settings: Settings) -> dict[str, Callable[..., Any]]:
    return {}
