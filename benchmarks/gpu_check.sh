#!/usr/bin/env bash
# Everything the CUDA path needs checked and timed on a GPU, in one command sized to take under
# 8 minutes on an H200 (its steps share a 470 s budget; not yet run on a GPU):
#   1. build for the visible GPU(s) only, and check that this checkout's build is imported;
#   2. the host-side checks: the launch-planning tests (tests/test_launch_plan.py) and test_build;
#   3. the CUDA tests: every CUDA case of test_taylor_reduce.py and test_compact.py, and
#      tests/test_cuda_ops.py (side stream and graph, a second GPU if present, inputs over 2^31
#      elements if memory allows, compaction in several scratch batches, every kernel path);
#   4. benchmarks/bench_ops.py --device cuda (x.sum() and device-to-device copy bandwidth measured
#      in the same run), benchmarks/bench_scoring.py --device cuda;
#   5. benchmarks/gpu_latency.py: batch-1 latency of Unet-resnet34 at 352 px, unpruned and pruned,
#      float16 and bfloat16 channels_last.
# Each step's full output goes to OUTDIR/<step>.log; a short table is printed last (and written
# to OUTDIR/summary.md). Without a GPU: steps 1-2, a line saying so, and exit 0 if they passed.
# The benchmarks do not write benchmarks/RESULTS.md (no --append): copy the numbers from the logs.
#
# Usage: benchmarks/gpu_check.sh OUTDIR
# Environment: PYTHON (default .venv/bin/python, else python3), TORCH_CUDA_ARCH_LIST (default:
# the visible GPUs' architectures), GPU_CHECK_BUDGET (seconds for all steps, default 470).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, not an installed one
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$SECONDS
ROWS=()
FAILED=0

# step NAME LIMIT COMMAND...: COMMAND with its output in OUT/NAME.log, stopped after LIMIT seconds
# (fewer when the budget is nearly spent), and a row of the final table.
step() {
  local name=$1 limit=$2 left status rc t0
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 15)); then
    ROWS+=("$name|not run: time budget spent|0")
    FAILED=1
    return 0
  fi
  echo "== $name (at most ${limit}s): $OUT/$name.log"
  t0=$SECONDS
  rc=0
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit}s"
  else
    status="FAILED (exit $rc)"
  fi
  ((rc == 0)) || FAILED=1
  ROWS+=("$name|$status|$((SECONDS - t0))")
  echo "   $status in $((SECONDS - t0))s"
}

# The table, the key numbers from the logs, and the exit status.
finish() {
  {
    echo
    echo "## gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "$GPUS"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
    for log in host_tests cuda_tests; do
      [[ -f "$OUT/$log.log" ]] && echo && echo "$log: $(grep -E '[0-9]+ (passed|failed)' "$OUT/$log.log" | tail -1)"
    done
    if [[ -f "$OUT/bench_ops.log" ]]; then
      echo
      echo "bench_ops totals (fused vs faster eager and torch.compile; min fraction of x.sum() bandwidth):"
      grep -E '^\| (float32|bfloat16) \| (NCHW|channels_last) \|' "$OUT/bench_ops.log" || true
      grep -E '^\| (x\.sum\(\)|copy_ device to device) \|' "$OUT/bench_ops.log" || true
    fi
    if [[ -f "$OUT/bench_scoring.log" ]]; then
      echo
      echo "bench_scoring (training step with scoring):"
      grep -E '^\| (plain|fused|torch) \|' "$OUT/bench_scoring.log" || true
    fi
    if [[ -f "$OUT/latency.log" ]]; then
      echo
      echo "batch-1 latency:"
      grep -E '^\| (unpruned|pruned)' "$OUT/latency.log" || true
    fi
  } | tee "$OUT/summary.md"
  exit "$FAILED"
}

{
  echo "python: $PYTHON"
  "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "CUDA", torch.version.cuda)'
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
  command -v nvcc >/dev/null && nvcc --version || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo "no nvcc on PATH"
} >"$OUT/environment.log" 2>&1 || true

NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if ((NGPU > 0)); then
  GPUS=$("$PYTHON" -c 'import torch; print("; ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())))')
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then  # the visible GPUs' architectures only
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch; print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))')
    export TORCH_CUDA_ARCH_LIST
  fi
  export POLYPRUNE_CUDA=1  # the CUDA kernels must build
else
  GPUS="No CUDA GPU visible: host-side checks only (build, launch planning tests)."
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step build 240 "$PYTHON" setup.py build_ext --inplace
# The build must be what Python imports from here (not an installed copy elsewhere).
step import 30 "$PYTHON" -c '
import os, sys, polyprune_ext
root = os.path.realpath(sys.argv[1])
print(polyprune_ext.__file__, polyprune_ext.build_info())
assert os.path.realpath(polyprune_ext.__file__).startswith(root + os.sep), "not this checkout"
' "$ROOT"
step host_tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_launch_plan.py tests/test_build.py

if ((NGPU == 0)); then
  echo "$GPUS The CUDA tests and benchmarks need a CUDA GPU."
  finish
fi

step cuda_tests 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k cuda \
  tests/test_taylor_reduce.py tests/test_compact.py tests/test_cuda_ops.py
step bench_ops 170 "$PYTHON" benchmarks/bench_ops.py --device cuda --min-run-time 0.05
step bench_scoring 90 "$PYTHON" benchmarks/bench_scoring.py --device cuda
step latency 90 "$PYTHON" benchmarks/gpu_latency.py --device cuda
finish
