#!/usr/bin/env bash
# The accelerator checks of issue 17 in one command, for a session with a GPU (budget: 8 minutes
# on one H100 / H200; each step has its own time limit so a slow one cannot starve the rest):
#
#   bash scripts/gpu_check.sh [OUT]        # default OUT=runs/gpu_check
#
# 1. cuDNN flash attention against the fp64 reference (bf16), the only test that needs a GPU;
# 2. compiled memory of the sd15 step at 16 pairs/device (target <= 80 GB) and of the sdxl step
#    at 4 pairs/device (target <= 80 GB), XLA's memory analysis on the GPU;
# 3. sd15 (512 px, 4 pairs) and sdxl (1024 px, 1 pair, remat full) train steps, bf16, attention
#    "auto" (= cuDNN): pairs/s, TFLOP/s, MFU against the 989 TFLOP/s datasheet peak, peak memory,
#    and the ratio to the PyTorch recipe (diffusers + peft, SDPA, bf16 autocast), eager.
# Results: OUT/*/memory.json, OUT/*/benchmark.json, and OUT/summary.txt (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
FAST="--config.torch_compile=False --config.sampling.enabled=False --config.parity=False \
  --config.warmup=2 --config.repeats=3 --config.steps_per_repeat=2"
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" 2>&1 | tail -25 | tee -a "$OUT/summary.txt"
  echo "   exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
step 60 "cuDNN attention vs reference" $PY -m pytest -q tests/test_attention_impl.py -k "cudnn or auto"
step 100 "sd15 memory, 16 pairs/device" $PY scripts/benchmark.py --config configs/benchmark.py:sd15 \
  --config.mode=memory --workdir "$OUT/sd15_memory"
step 120 "sd15 step vs torch, 4 pairs" $PY scripts/benchmark.py --config configs/benchmark.py:sd15 $FAST \
  --workdir "$OUT/sd15"
step 100 "sdxl memory, 4 pairs/device" $PY scripts/benchmark.py --config configs/benchmark.py:sdxl \
  --config.mode=memory --workdir "$OUT/sdxl_memory"
step 150 "sdxl step vs torch, 1 pair" $PY scripts/benchmark.py --config configs/benchmark.py:sdxl $FAST \
  --workdir "$OUT/sdxl"
