"""Engines (spot, futures), their indicators and strategies, and the Orchestrator that supervises them."""
