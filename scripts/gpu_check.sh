#!/usr/bin/env bash
# The prepared GPU run, for a session lent a GPU through the device tool: one call,
#     run(command="bash scripts/gpu_check.sh", carry=[".whl", ".triton_cache"], timeout_s=480)
# Stages, in priority order, each under its own time limit so that a hang or crash in one still returns the
# others' results (all output in $OUT/log.txt, JSON beside it; at most 8 files come back):
#   env         GPU, driver, torch / triton versions
#   tests       the Triton kernel tests on CUDA, the captured-graph test, the engine on CUDA vs CPU (pytest-xdist)
#   full_shape  bench/full_shape.py: the 48-layer FP8 model with random weights through the engine
#   kernels     bench/kernel_bench.py: each kernel vs its reference at the real shapes (+ flash-linear-attention)
#   graphs      bench/graphs.py: eager vs replayed decode steps on 4 real layers
# STAGES="tests kernels" runs a subset; a stage's limit can be changed with e.g. LIMIT_full_shape=300.
# That machine has torch, triton, pytest, safetensors and tokenizers but not this package: a folder of links
# gives the repository's folders the import names an install gives them (qnext.kernels, qnext.worker, ...).
# .whl (carried, git-ignored) may hold wheels to install there (flash-linear-attention as the kernels' reference);
# .triton_cache (carried, git-ignored) is a previous run's compiled kernels; TRITON_CACHE_TGZ=1 leaves this run's in
# $OUT/triton_cache.tgz (unpack it into .triton_cache for the next call; ~21 MB, over the 16 MiB a file may be).
# KERNELS_ARGS adds arguments to bench/kernel_bench.py (e.g. "--ops gdr,fla").
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
LINKS=$(mktemp -d)/src
mkdir -p "$LINKS/qnext"
ln -s "$PWD/kernels" "$LINKS/qnext/kernels"
ln -s "$PWD/worker" "$LINKS/qnext/worker"
ln -s "$PWD/qnext_rpc" "$LINKS/qnext/rpc"
ln -s "$PWD/proto/qnext/v1" "$LINKS/qnext/v1"
export PYTHONUNBUFFERED=1 PYTHONPATH="$LINKS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
STAGES=${STAGES:-env tests full_shape kernels graphs}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p "$TRITON_CACHE_DIR"
[ -d .triton_cache ] && cp -r .triton_cache/. "$TRITON_CACHE_DIR"/

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log to $LOG, never stop the script
    local name=$1 limit=$2 var="LIMIT_$1"
    shift 2
    limit=${!var:-$limit}
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
}

stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, \
    torch.cuda.get_device_name(), torch.cuda.get_device_capability())'; \
    $PY -c 'import fla; print(\"fla\", fla.__version__)' || true"
stage tests 120 "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 120 -rfE --junitxml "$OUT/tests.xml" \
    tests/test_triton_fp8.py tests/test_triton_norms.py tests/test_triton_conv1d.py \
    tests/test_triton_gated_delta_rule.py tests/test_triton_attention.py tests/test_triton_moe.py \
    tests/test_step_metadata.py tests/test_engine_cuda.py tests/test_triton_model.py \
    "tests/test_graph_runner.py::test_padded_static_steps_match_the_plain_forward"
stage full_shape 210 "$PY" bench/full_shape.py --budget-s 180 --out "$OUT/full_shape.json"
stage kernels 80 "$PY" bench/kernel_bench.py --time-budget-s 65 --out "$OUT/kernels.json" ${KERNELS_ARGS:-}
stage graphs 40 "$PY" bench/graphs.py --batch-sizes 1,8,64 --iters 10 --out "$OUT/graphs.json"
[ -n "${TRITON_CACHE_TGZ:-}" ] && tar -czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>>"$LOG"
ls -la "$OUT" | tee -a "$LOG"
