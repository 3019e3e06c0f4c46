#!/usr/bin/env bash
# Set up the virtualenv with the test-only dependencies and run the tests (what CI's .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh "[test]"
python -m pytest -q "$@"
