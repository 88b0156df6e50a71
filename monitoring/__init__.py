"""Health, alerts, Telegram, logging, systemd notify and metrics. Never imports `engines`."""
