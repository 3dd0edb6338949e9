#!/usr/bin/env bash
# Create .venv and install passuntil with its dev tools. Idempotent: a second run is quick.
# The CPU wheel of PyTorch is installed first, so the project's torch range is already
# satisfied and pip never downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() {  # quiet pip that still fails loudly; drops this machine's harmless local-index warnings
  local rc=0
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" >.venv/pip.log 2>&1 || rc=$?
  grep -v "is ignored: it is neither" .venv/pip.log || true
  return $rc
}
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev]"
# BIG-bench task files: extracted once from the bigbench sdist on PyPI into $PASSUNTIL_DATA
# (default ~/.cache/passuntil); a second run finds them and does nothing.
.venv/bin/passuntil fetch-data
.venv/bin/python -c "import passuntil, torch; print('passuntil', passuntil.__version__, '| torch', torch.__version__)"
