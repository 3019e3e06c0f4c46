#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the local wheel, never a multi-GB CUDA build) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[test]'
python -m pytest -q "$@"
