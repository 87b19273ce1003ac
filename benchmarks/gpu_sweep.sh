#!/usr/bin/env bash
# Every GPU goal of the project measured on a fresh H100/H200, in one or two device calls.
#
#   bash benchmarks/fetch_wheels.sh                 # here, once: wheels the GPU image lacks -> .whl/
#   device run (carry .whl): bash benchmarks/gpu_sweep.sh [STAGE ...]
#   bash benchmarks/gpu_sweep.sh --dry-run [STAGE ...]   # on a CPU: the same stages at tiny sizes
# The device copies the working tree as it is, others' unfinished edits included; to measure a
# commit, export it (benchmarks/export_tree.sh -> .snap/, carried) and run the sweep from there.
#
# Stages (default: all, in this order; together about 14 minutes on an H100, more than one call
# may run: split them, e.g. `tests rollout rollout_lora decode host` then `train memory7b kernels model`):
#   tests        gpu-marked tests (bf16 kernels at V 151936, CUDA-graph engine, flex packing)
#   rollout      bench_rollout: engine vs generate, 3B shape, B = 16 x G = 8
#   rollout_lora bench_rollout --lora 64: decode step with LoRA, cached adapters vs per-call casts
#   decode       bench_decode_layer: 3B decoder layers' decode step, eager ops vs fused kernels
#   host         profile_host: host share of a decode step at batch 64 (csrc/ decision)
#   train        bench_train_step: one GRPO step vs TRL's GRPOTrainer, 3B shape
#   memory7b     bench_train_step --memory-7b: RePIC's 7B LoRA recipe on one GPU
#   kernels      bench_kernels: log-probs / GRPO loss / fused linear vs torch, compile, liger
#   model        bench_model: group-packed vs unpacked training forward+backward
# Each stage runs under its own time limit; the device returns at most 8 files, so the logs and
# the records go back as one archive ($OUT/sweep.tgz, rewritten after every stage so that a run
# cut short still returns what it finished) with the one-screen table ($OUT/table.txt) beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlpt_sweep}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
DRY=0; [ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
STAGES=${*:-tests rollout rollout_lora decode host train memory7b kernels model}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
REV=${RLPT_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

pack() {
  cp benchmarks/results/*.jsonl "$LOGS/" 2>/dev/null
  $PY benchmarks/sweep_table.py --since-git "$REV" > "$OUT/table.txt" 2>&1
  tar czf "$OUT/sweep.tgz" -C "$LOGS" .
}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$LOGS/$name.log" | cut -c1-400
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  echo "$name $rc $((SECONDS - t0))" >> "$LOGS/stages.txt"
  pack
}

if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $(ls .whl/*.whl | grep -v rlpt_fast) > "$LOGS/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; tail -5 "$LOGS/wheels.log"; }
fi
# The project from this tree (no network: the image's own setuptools builds it).
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 \
  || { echo "editable install failed"; tail "$LOGS/install.log"; }
$PY - <<'PY' | tee "$LOGS/env.txt"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used --format=csv \
  >> "$LOGS/env.txt" 2>&1

for s in $STAGES; do
  if [ $DRY = 1 ]; then
    case $s in
      tests)    stage tests 300 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_bf16.py ;;
      rollout)  stage rollout 300 $PY benchmarks/bench_rollout.py --repeat 1 --new-tokens 64 ;;
      rollout_lora) stage rollout_lora 300 $PY benchmarks/bench_rollout.py --lora 64 --repeat 1 --new-tokens 64 ;;
      decode)   stage decode 120 $PY benchmarks/bench_decode_layer.py ;;
      host)     stage host 120 $PY benchmarks/profile_host.py --batch 2 --new-tokens 16 ;;
      train)    stage train 400 $PY benchmarks/bench_train_step.py ;;
      memory7b) echo "memory7b: GPU only" ;;
      kernels)  stage kernels 300 $PY benchmarks/bench_kernels.py ;;
      model)    stage model 300 $PY benchmarks/bench_model.py ;;
      *) echo "unknown stage $s" ;;
    esac
  else
    case $s in
      tests)    stage tests 80 $PY -m pytest -q -p no:cacheprovider --tb=short -m gpu tests ;;
      rollout)  stage rollout 130 $PY benchmarks/bench_rollout.py ;;
      rollout_lora) stage rollout_lora 120 $PY benchmarks/bench_rollout.py --lora 64 ;;
      decode)   stage decode 90 $PY benchmarks/bench_decode_layer.py ;;
      host)     stage host 45 $PY benchmarks/profile_host.py ;;
      train)    stage train 200 $PY benchmarks/bench_train_step.py --steps 1 ;;  # TRL: ~60 s a step
      memory7b) stage memory7b 65 $PY benchmarks/bench_train_step.py --memory-7b ;;
      kernels)  stage kernels 80 $PY benchmarks/bench_kernels.py --tokens 4096 16384 ;;
      model)    stage model 120 $PY benchmarks/bench_model.py --models 3b --warmup 2 --repeat 5 ;;
      *) echo "unknown stage $s" ;;
    esac
  fi
done
cat "$OUT/table.txt"
