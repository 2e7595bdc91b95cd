#!/usr/bin/env bash
# Set up .venv (with test tools) and run the whole test suite. Extra args go to pytest.
# Two pytest-xdist workers (the CI machine has 2 cores; TEST_WORKERS=0 runs everything in one
# process): each file is one unit of work and the heaviest go first (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --dev
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" "$@"
