#!/usr/bin/env bash
# Every GPU goal of the project measured in one run on a fresh H100/H200 (issue 8).
#
#   bash benchmarks/fetch_wheels.sh            # here, once: wheels the GPU image lacks -> .whl/
#   device run (carry .whl): bash benchmarks/gpu_sweep.sh
#   bash benchmarks/gpu_sweep.sh --dry-run     # on a CPU: the same stages at tiny sizes
#
# Stages, each under its own time limit so the whole run stays inside 10 minutes: install,
# gpu-marked tests, bench_kernels, bench_model, bench_rollout, bench_train_step, then a
# one-screen table of every goal (printed last). Records are appended to benchmarks/results/ by
# each benchmark (with the card's name) and copied to $OUT with the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlpt_sweep}
mkdir -p "$OUT"
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/stages.txt"
}

if [ $DRY = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $(ls .whl/*.whl | grep -v rlpt_fast) && export PYTHONPATH=/tmp/site
fi
# The project from this tree (no network: the image's own setuptools builds it).
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "editable install failed"; tail "$OUT/install.log"; }
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY

if [ $DRY = 1 ]; then
  stage tests 300 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_bf16.py
  stage bench_kernels 300 $PY benchmarks/bench_kernels.py
  stage bench_model 300 $PY benchmarks/bench_model.py
  stage bench_rollout 300 $PY benchmarks/bench_rollout.py
  stage bench_train_step 400 $PY benchmarks/bench_train_step.py
else
  stage tests 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests
  stage bench_kernels 150 $PY benchmarks/bench_kernels.py
  stage bench_model 90 $PY benchmarks/bench_model.py
  stage bench_rollout 100 $PY benchmarks/bench_rollout.py
  stage bench_train_step 90 $PY benchmarks/bench_train_step.py
  stage bench_train_step_7b 50 $PY benchmarks/bench_train_step.py --memory-7b
fi
cp benchmarks/results/*.jsonl "$OUT/" 2>/dev/null
$PY benchmarks/sweep_table.py --since-git "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  | tee "$OUT/table.txt"
