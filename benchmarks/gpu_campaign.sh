#!/usr/bin/env bash
# Every GPU goal in one short run (issue 21), sized for one lent H100/H200: at most 9 minutes.
#
#   bash benchmarks/gpu_campaign.sh OUTDIR             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_campaign.sh OUTDIR --dry-run   # the same parts at tiny shapes on this CPU (a test)
#
# Parts, in this order, each under its own timeout (so one that fails or hangs leaves the others' results),
# all together bounded to 540 s (a part gets what is left when its turn comes):
#   kernels   python benchmarks/bench_kernels.py --check: every Triton kernel against the float64 reference   75 s
#   train_2k  python benchmarks/bench_train_step.py: xlstm_large_400m and llama_400m at B8xS2048,
#             eager and compiled (train.compile), bf16 autocast, fused AdamW                       165 s
#   train_8k  the same at B2xS8192                                                                 165 s
#   decode    python benchmarks/bench_decode.py: batch-1 decode of xlstm_large_400m after 1k/4k/16k
#             tokens, the fused step (base), with programmatic dependent launch (pdl) and the
#             compiled step (compiled, today's default), interleaved in one process                130 s
# Then one table (benchmarks/campaign_table.py) of every figure against its goal, with the ratios.
# Files in OUTDIR (8, what a lent machine's $OUT gives back): campaign.log (command, commit, machine, and a
# line `part<TAB>NAME<TAB>EXIT<TAB>SECONDS` per part), <part>.log for the four parts, train.jsonl and
# decode.jsonl (one JSON line per measurement), table.md (the table). Needs only python3 with torch and triton: no
# DeepSpeed, Ray, OmegaConf or WebDataset, and no install of the project (benchmarks/_xlp_path.sh makes xlp.*
# importable). PYTHON=... picks the interpreter; COMMIT=... names the commit measured when the copy has no
# .git. Exit status: 0 when every part exited 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: bash benchmarks/gpu_campaign.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/train.jsonl "$OUTDIR"/decode.jsonl "$OUTDIR"/campaign.log
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python3 >/dev/null; then PY=python3
else PY=python; fi
source benchmarks/_xlp_path.sh
export PYTHONUNBUFFERED=1
unset XLP_KERNEL_BACKEND
[ $DRY -eq 0 ] && unset TRITON_INTERPRET
TOTAL=${CAMPAIGN_SECONDS:-540}
T0=$(date +%s)
DEADLINE=$(( T0 + TOTAL - 10 ))  # 10 s kept for the table
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
  echo "command: bash benchmarks/gpu_campaign.sh $*"
  echo "commit: $COMMIT$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes, or no .git)')"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname 2>/dev/null), $(nproc 2>/dev/null) CPUs"
  echo "$XLP_SOURCE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUTDIR/campaign.log"

part() {  # part NAME BUDGET_S COMMAND...: run it under min(BUDGET, time left), log to OUTDIR/NAME.log
  local name=$1 budget=$2
  shift 2
  local now left limit rc
  now=$(date +%s)
  left=$(( DEADLINE - now ))
  limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, no time left =="
    printf 'part\t%s\tskipped\t0\n' "$name" >> "$OUTDIR/campaign.log"
    return
  fi
  echo "== $name (limit ${limit}s; $(( now - T0 ))s so far) =="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "!! $name TIMED OUT after ${limit}s"
  printf 'part\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - now ))" >> "$OUTDIR/campaign.log"
}

if [ $DRY -eq 1 ]; then
  # tiny models on the CPU: the same commands, options and files, seconds instead of minutes
  TRAIN=(--models tiny_xlstm_large,tiny_llama --device cpu --compile-backend aot_eager --vocab-size 512
         --steps 1 --warmup 1)
  part kernels 120 env TRITON_INTERPRET=1 "$PY" benchmarks/bench_kernels.py --check-cpu
  part train_2k 150 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --shape 2x64 --json "$OUTDIR/train.jsonl"
  part train_8k 150 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --shape 1x128 --json "$OUTDIR/train.jsonl"
  part decode 120 "$PY" benchmarks/bench_decode.py --model tiny_xlstm_large --device cpu --vocab-size 512 \
    --contexts 16,32 --new-tokens 4 --warmup 1 --fused --variant pdl:pdl=true --variant compiled:fused=false \
    --json "$OUTDIR/decode.jsonl"
else
  TRAIN=(--models xlstm_large_400m,llama_400m --modes eager,compiled --steps 10 --warmup 3)
  part kernels 75 "$PY" benchmarks/bench_kernels.py --check
  part train_2k 165 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --shape 8x2048 --json "$OUTDIR/train.jsonl"
  part train_8k 165 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --shape 2x8192 --json "$OUTDIR/train.jsonl"
  part decode 130 "$PY" benchmarks/bench_decode.py --model xlstm_large_400m --contexts 1024,4096,16384 \
    --new-tokens 128 --fused --variant pdl:pdl=true --variant compiled:fused=false --json "$OUTDIR/decode.jsonl"
fi

echo "== table ($(( $(date +%s) - T0 ))s so far) =="
"$PY" benchmarks/campaign_table.py "$OUTDIR" | tee "$OUTDIR/table.md"
echo "campaign: $(( $(date +%s) - T0 ))s in all; logs in $OUTDIR"
awk -F'\t' '$1 == "part" && $3 != "0" { bad = 1 } END { exit bad }' "$OUTDIR/campaign.log"
