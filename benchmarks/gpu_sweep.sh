#!/usr/bin/env bash
# Every GPU goal of the project measured on a fresh H100/H200, in one or two device calls.
#
#   bash benchmarks/fetch_wheels.sh                 # here, once: wheels the GPU image lacks -> .whl/
#   device run (carry .whl): bash benchmarks/gpu_sweep.sh [STAGE ...]
#   bash benchmarks/gpu_sweep.sh --dry-run [STAGE ...]   # on a CPU: the same stages at tiny sizes
# The device copies the working tree as it is, others' unfinished edits included (records then say
# git REV-dirty); to measure a commit, export it (benchmarks/export_tree.sh -> .snap/, carried) and
# run the sweep from there: its REVISION names the commit, and ../.whl serves for its wheels.
# A dry run appends its CPU records to $OUT/results/, never to benchmarks/results/.
#
# Stages (default: all, in this order). Seconds on the H100 of 2026-11-27: tests ~115 (30 tests,
# 104 s inside pytest), rollout 81, rollout_lora 36, decode 12, host 22, train 281 (ours' two
# compiling warm-up steps 96 + 24 s, TRL's two steps 70 + 48 s), memory7b ~60 after train (its
# compiles then reuse inductor's on-disk cache; alone, expect train's first-step compile); more
# than one call's 10 minutes in all, and a task has 15 minutes of device time with the starts: run
# what is owed first (benchmarks/README.md, "Next device run"), the rest in a second call at once.
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
# The revision every record names (common.git_revision's rule): an export's REVISION, else HEAD,
# with -dirty when files git does not ignore differ from it (edits, new files; records aside).
if [ -f REVISION ]; then REV=${RLPT_GIT_REV:-$(cat REVISION)}
else REV=${RLPT_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
       [ -n "$(git status --porcelain -- ':/' ':(top,exclude)benchmarks/results' 2>/dev/null)" ] && echo -dirty)}
fi
export RLPT_GIT_REV=$REV
RESULTS=benchmarks/results
# A dry run shares a small CPU: OpenMP threads that spin while waiting would slow it several times.
[ $DRY = 1 ] && { RESULTS=$OUT/results; mkdir -p "$RESULTS"; export RLPT_RESULTS_DIR=$RESULTS OMP_WAIT_POLICY=PASSIVE; }
WHL=.whl; [ -d .whl ] || [ ! -d ../.whl ] || WHL=../.whl  # run from .snap/: the wheels beside it

pack() {
  cp "$RESULTS"/*.jsonl "$LOGS/" 2>/dev/null
  $PY benchmarks/sweep_table.py --since-git "$REV" > "$OUT/table.txt" 2>&1
  tar czf "$OUT/sweep.tgz" -C "$LOGS" .
}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  [ $DRY = 1 ] || nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null \
    | sed "s/^/$name: GPU already in use by /"
  # --kill-after: a stage that outlives its SIGTERM must not hold the card under the next one
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$LOGS/$name.log" | cut -c1-400
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  echo "$name $rc $((SECONDS - t0))" >> "$LOGS/stages.txt"
  [ $rc = 0 ] || FAILED="$FAILED $name"
  pack
}
FAILED=

if [ $DRY = 0 ] && ls $WHL/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $(ls $WHL/*.whl | grep -v rlpt_fast) > "$LOGS/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; tail -5 "$LOGS/wheels.log"; }
fi
# The project from this tree (no network: the image's own setuptools builds it, csrc/ included).
# A dry run installs nothing: it runs in a shared development venv, where a reinstall would rebuild
# csrc/ under others' running tests or repoint the venv; it says when that venv imports another tree.
here=$(pwd -P)
if [ $DRY = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 \
    || { echo "editable install failed"; tail "$LOGS/install.log"; }
elif ! (cd / && $PY -c "import sys, rlpt_fast, rlpt_kernels; from pathlib import Path
sys.exit(any(Path(m.__file__).resolve().parents[1] != Path('$here') for m in (rlpt_fast, rlpt_kernels)))") \
     2>/dev/null; then
  echo "WARNING: $PY does not import rlpt_fast / rlpt_kernels from $here: the dry run checks that install"
fi
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
      tests)    stage tests 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests ;;  # all collected, all skipped
      rollout)  stage rollout 300 $PY benchmarks/bench_rollout.py --repeat 1 --new-tokens 64 ;;
      rollout_lora) stage rollout_lora 300 $PY benchmarks/bench_rollout.py --lora 64 --repeat 1 --new-tokens 64 ;;
      decode)   stage decode 120 $PY benchmarks/bench_decode_layer.py ;;
      host)     stage host 120 $PY benchmarks/profile_host.py --batch 2 --new-tokens 16 ;;
      train)    stage train 400 $PY benchmarks/bench_train_step.py ;;
      memory7b) stage memory7b 300 $PY benchmarks/bench_train_step.py --memory-7b --steps 1 ;;  # the recipe, tiny
      kernels)  stage kernels 300 env RLPT_KERNELS_BACKEND=triton TRITON_INTERPRET=1 \
                  $PY benchmarks/bench_kernels.py --vocab 2048 --hidden 64 ;;  # the Triton launches
      model)    stage model 300 $PY benchmarks/bench_model.py ;;
      *) echo "unknown stage $s"; FAILED="$FAILED $s" ;;
    esac
  else
    case $s in
      tests)    stage tests 180 $PY -m pytest -q -p no:cacheprovider --tb=short --durations=8 -m gpu tests ;;
      rollout)  stage rollout 130 $PY benchmarks/bench_rollout.py ;;
      rollout_lora) stage rollout_lora 120 $PY benchmarks/bench_rollout.py --lora 64 ;;
      decode)   stage decode 90 $PY benchmarks/bench_decode_layer.py ;;
      host)     stage host 60 $PY benchmarks/profile_host.py ;;  # 26 s on 2026-11-26, before the stubbed run
      train)    stage train 400 $PY benchmarks/bench_train_step.py --steps 1 ;;  # ~340 s: ours ~175 (2 compiling warm-up steps), TRL 2 x ~74
      memory7b) stage memory7b 200 $PY benchmarks/bench_train_step.py --memory-7b --steps 1 ;;  # after train: ~60 s
      kernels)  stage kernels 80 $PY benchmarks/bench_kernels.py --tokens 4096 16384 ;;
      model)    stage model 240 $PY benchmarks/bench_model.py --models 3b --warmup 2 --repeat 5 ;;  # flex compiles ~95 s cold
      *) echo "unknown stage $s"; FAILED="$FAILED $s" ;;
    esac
  fi
done
cat "$OUT/table.txt" 2>/dev/null
[ -z "$FAILED" ] || { echo "stages that failed:$FAILED"; exit 1; }
