"""The chaos harness: the daemon as a subprocess against a fake exchange process, SIGKILLed at seeded
random moments of its order flow, restarted on the same ledger, and checked against the exchange's
own record."""
