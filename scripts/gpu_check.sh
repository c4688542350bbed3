#!/usr/bin/env bash
# The accelerator checks of issue 17 in one command, for a session with a GPU (budget: 8 minutes
# on one H100 / H200; each step has its own time limit so a slow one cannot starve the rest):
#
#   bash scripts/gpu_check.sh [OUT]        # default OUT=runs/gpu_check
#
# 1. cuDNN flash attention against the fp64 reference (bf16), the only test that needs a GPU;
# 2. compiled memory of the sd15 step at 16 pairs/device (target <= 80 GB) and of the sdxl step
#    at 4 pairs/device (target <= 80 GB; remat per layer, the preset, then per block to compare),
#    XLA's memory analysis on the GPU;
# 3. sd15 (512 px, 4 pairs) and sdxl (1024 px, 1 pair, remat per layer) train steps, bf16, attention
#    "auto" (= cuDNN): pairs/s, TFLOP/s, MFU against the 989 TFLOP/s datasheet peak, peak memory,
#    and the ratio to the PyTorch recipe (diffusers + peft, SDPA, bf16 autocast), eager.
# Results: OUT/*/memory.json, OUT/*/benchmark.json, one log per step and OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
FAST="--config.torch_compile=False --config.sampling.enabled=False --config.parity=False \
  --config.warmup=2 --config.repeats=3 --config.steps_per_repeat=2"
step() {  # step SECONDS NAME COMMAND...: runs in its own process group, all of which ends at the limit
  local limit=$1 name=$2 log="$OUT/$(echo "$2" | tr -c 'a-z0-9\n' '_').log"; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  setsid timeout "$limit" "$@" > "$log" 2>&1 &
  local pid=$!
  wait $pid; local status=$?
  kill -- -$pid 2>/dev/null  # benchmark workers left behind by a timeout
  grep -v "Warning\|warn(\|deprecat\|it/s\]" "$log" | tail -25 | tee -a "$OUT/summary.txt"
  echo "   exit $status" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
# in order of priority; the last one is cut first when the 8 minutes run short
step 45 "cudnn attention vs reference" $PY -m pytest -q tests/test_attention_impl.py -k "cudnn or auto"
step 120 "sd15 memory 16 pairs" $PY scripts/benchmark.py --config configs/benchmark.py:sd15 \
  --config.mode=memory --workdir "$OUT/sd15_memory"
step 120 "sdxl memory 4 pairs" $PY scripts/benchmark.py --config configs/benchmark.py:sdxl \
  --config.mode=memory --workdir "$OUT/sdxl_memory"
step 90 "sdxl memory 4 pairs, remat per block" $PY scripts/benchmark.py --config configs/benchmark.py:sdxl \
  --config.mode=memory --config.remat_policy=full --workdir "$OUT/sdxl_memory_per_block"
step 150 "sd15 step vs torch 4 pairs" $PY scripts/benchmark.py --config configs/benchmark.py:sd15 $FAST \
  --workdir "$OUT/sd15"
step 200 "sdxl step vs torch 1 pair" $PY scripts/benchmark.py --config configs/benchmark.py:sdxl $FAST \
  --workdir "$OUT/sdxl"
