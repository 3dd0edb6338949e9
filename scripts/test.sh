#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# The BIG-bench tests must run here, not skip: setup fetched the data.
PASSUNTIL_REQUIRE_DATA=1 .venv/bin/python -m pytest "$@"
