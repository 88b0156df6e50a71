"""Backtesting: the engines' strategy and risk code driven by a simulated clock over history."""
