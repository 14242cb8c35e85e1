#!/usr/bin/env bash
# One-shot GPU check of the Triton kernels (issue 8), sized for a lent H100 (~4.5 minutes at most):
#   (a) correctness of every Triton kernel at real shapes, bf16 and fp32. mLSTM/sLSTM are compared
#       fairly: float64 reference on the SAME rounded inputs, with the reference's own bf16 error
#       printed as the yardstick (err/yardstick per quantity); [ok]/[FAIL] per kernel;
#   (b) python benchmarks/bench_kernels.py --sweep: times launch-config variants of the mLSTM kernels (fwd and
#       bwd separately, S=2k and 32k, ~100 s budget), then the table (65,536 tokens/step, S in
#       {2k, 8k, 32k}, NH=16, DQK=128, DV=256, bf16) for the default AND the best config, beside
#       torch SDPA flash (NH=32, D=128) and mlstm_kernels if importable;
#   (c) a compact summary (the [ok]/[FAIL] lines, SUMMARY lines, the tuned kernels.mlstm.* overrides).
# Usage (repo root, CUDA machine):  bash benchmarks/gpu_kernels_check.sh [extra benchmarks/bench_kernels.py args]
# Needs python with torch and triton; the project need not be installed (benchmarks/_xlp_path.sh).
# Exit status: non-zero if any check failed, the bench crashed or a step timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
source benchmarks/_xlp_path.sh
echo "$XLP_SOURCE"
unset TRITON_INTERPRET
LOG=$(mktemp)
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== (a) correctness vs float64 reference on the same inputs =="
timeout 90 "$PY" benchmarks/bench_kernels.py --check 2>&1 | tee "$LOG"
rc_check=${PIPESTATUS[0]}
echo "== (b) sweep + benchmark ($(( $(date +%s) - t0 ))s so far) =="
timeout 175 "$PY" benchmarks/bench_kernels.py --sweep --sweep-budget 100 --rep-ms 100 "$@" 2>&1 | tee -a "$LOG"
rc_bench=${PIPESTATUS[0]}
echo "== (c) summary ($(( $(date +%s) - t0 ))s total) =="
grep -E "^\s+\[(ok|FAIL)|^SUMMARY|sweep (fwd|bwd): best|Traceback|Error" "$LOG" | cut -c1-200
[ $rc_check -eq 124 ] && echo "!! check TIMED OUT"
[ $rc_bench -eq 124 ] && echo "!! bench TIMED OUT"
echo "== gpu_kernels_check: check rc=$rc_check bench rc=$rc_bench  => $([ $rc_check -eq 0 ] && [ $rc_bench -eq 0 ] && echo PASS || echo FAIL) =="
rm -f "$LOG"
exit $(( rc_check != 0 || rc_bench != 0 ))
