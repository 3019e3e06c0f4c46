#!/usr/bin/env bash
# The prepared GPU run (issue 6), for a session lent a GPU through the device tool: one call,
#     run(command="bash scripts/gpu_check.sh", timeout_s=540)
# runs the Triton kernel tests on CUDA, the decode-graph capture check (tests/test_graph_runner.py captures real
# graphs where CUDA exists), then bench/graphs.py and bench/kernels.py. Logs and JSON land in $OUT (at most 8
# files come back). Every stage has its own time limit so that a hang in one still returns the others' results.
# That machine has torch, triton, pytest, safetensors and tokenizers but not this package: PYTHONPATH stands in.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

stage env 30 "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
stage tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_fp8.py tests/test_triton_norms.py \
    tests/test_triton_conv1d.py tests/test_triton_gated_delta_rule.py tests/test_triton_attention.py \
    tests/test_triton_moe.py tests/test_step_metadata.py \
    "tests/test_graph_runner.py::test_padded_static_steps_match_the_plain_forward"
stage graphs 150 "$PY" bench/graphs.py --batch-sizes 1,8,64 --out "$OUT/graphs.json"
stage kernels 120 "$PY" bench/kernels.py --out "$OUT/kernels.json"
