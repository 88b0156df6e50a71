"""Clock, domain types, error kinds and the in-process event bus: the layer everything else builds on."""
