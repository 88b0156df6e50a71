"""The SQLite ledger: orders, fills, positions, engine and risk state, the append-only journal."""
