#!/usr/bin/env bash
# Create .venv if missing, install the project with its dev extra, and run the whole test suite.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k ledger).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
