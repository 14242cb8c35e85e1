#!/usr/bin/env bash
# One-shot GPU check of the Triton kernels (issue 8), sized for a lent H100 (< 6 minutes):
#   (a) correctness of every Triton kernel vs the reference backend at real shapes, bf16 and fp32
#       (prints max-normalised errors, [ok]/[FAIL] per kernel);
#   (b) python -m kernels.bench: mLSTM fwd and fwd+bwd ms + peak memory at 65,536 tokens/step,
#       S in {2k, 8k, 32k}, NH=16, DQK=128, DV=256, bf16, beside torch SDPA flash (NH=32, D=128)
#       and the official mlstm_kernels package if it happens to be importable.
# Usage (repo root, CUDA machine):  bash kernels/gpu_check.sh [extra kernels.bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== (a) correctness vs reference =="
timeout 200 "$PY" -m kernels.bench --check
rc_check=$?
echo "== (b) benchmark =="
timeout 300 "$PY" -m kernels.bench --rep-ms 100 "$@"
rc_bench=$?
echo "== gpu_check: check rc=$rc_check bench rc=$rc_bench =="
exit $(( rc_check != 0 || rc_bench != 0 ))
