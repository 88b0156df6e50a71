#!/usr/bin/env bash
# Create .venv if missing, install the project into it, and run the daemon with any arguments given:
#   ./start_backend.sh --replay          paper-trade offline on the bundled market data
#   ./start_backend.sh check-config      print the effective settings (secrets masked)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/bootstrap.sh
exec .venv/bin/python main.py "$@"
