"""Loopback fakes of external services, for tests and benchmarks."""
