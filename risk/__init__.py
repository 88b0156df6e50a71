"""Pure risk decisions: capital allocation, the global risk monitor, the one pre-trade gate. No I/O."""
