#!/usr/bin/env bash
# Set up and run the main job on the embedded default checkpoint.
# Until the gRPC service lands (issue 5), the main job is offline batch generation with qnext-batch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e .
mkdir -p out
qnext-batch --input examples/prompts.jsonl --output out/results.jsonl "$@"
cat out/results.jsonl
