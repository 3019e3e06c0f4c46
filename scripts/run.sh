#!/usr/bin/env bash
# Set up and run the main job: the gRPC service on the embedded default checkpoint (generated on first use).
# Extra arguments go to qnext-serve, e.g. `bash scripts/run.sh --port 50052 --num-speculative-tokens 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh ""  # no extras (sourced without arguments it would see ours as its $1)
exec qnext-serve "$@"
