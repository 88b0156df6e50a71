"""The market: the ccxt client (testnet/live), the paper exchange, data feeds and the order manager."""
