#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test opens the HTML report in Debian's headless Chromium; install it where we can.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
    apt-get install -y -q chromium >/dev/null 2>&1; } || echo "note: could not install chromium"
fi
command -v chromium >/dev/null && export PASSUNTIL_REQUIRE_CHROMIUM=1
# The sampler's CPU kernels are compiled with the system C compiler: the kernel tests must run.
if ! command -v cc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q gcc >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
    apt-get install -y -q gcc >/dev/null 2>&1; } || echo "note: could not install gcc"
fi
command -v cc >/dev/null && export PASSUNTIL_REQUIRE_KERNEL=1
.venv/bin/ruff check src tests benchmarks
# The BIG-bench tests must run here, not skip: setup fetched the data.
PASSUNTIL_REQUIRE_DATA=1 .venv/bin/python -m pytest "$@"
