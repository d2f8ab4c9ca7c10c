#!/usr/bin/env bash
# The speed issue's GPU measurements in one call, for a lent GPU's short lease: the machine,
# eager traces on a Llama-3.2-1B-shaped model against hand-written hooks (target ≤ 1.05×),
# compiled replay against those hooks (target ≥ 4× their speed, CUDA graphs), then the tiny
# model's per-trace costs on CUDA. Each step has its own time limit, so one that hangs leaves
# the others' numbers; logs and JSON go to $OUT (default /tmp/lazytensor-gpu).
#
#   bash benchmarks/gpu.sh                                        # on the GPU machine
#   DEVICE=cpu DTYPE=float32 SIZE=tiny bash benchmarks/gpu.sh     # a dry run of the script
#
# It needs torch, transformers, tokenizers, msgpack, numpy and rich; it imports the package
# from the checkout (PYTHONPATH), so nothing is installed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lazytensor-gpu}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} SIZE=${SIZE:-1b} REPEATS=${REPEATS:-50}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/server${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
common=(--device "$DEVICE" --dtype "$DTYPE")

STEPS=${STEPS:-trace_1b compiled_1b trace_tiny}  # a subset, to run some again

step() {  # step NAME SECONDS COMMAND...: run it with a limit, its output also in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())"
    git log -1 --format='lazytensor %h %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/machine.log"

step trace_1b 150 $PY benchmarks/bench_trace.py --size "$SIZE" "${common[@]}" \
    --repeats "$REPEATS" --generate --json "$OUT/trace_1b.json"
step compiled_1b 330 $PY benchmarks/bench_compiled.py --size "$SIZE" "${common[@]}" \
    --repeats "$REPEATS" --json "$OUT/compiled_1b.json"
step trace_tiny 120 $PY benchmarks/bench_trace.py --size tiny "${common[@]}" \
    --repeats 100 --json "$OUT/trace_tiny.json"

echo "== summary"
grep -h -E "^target|× the speed|relative error|forced values|: exit" "$OUT"/*.log
