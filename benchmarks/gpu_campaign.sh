#!/usr/bin/env bash
# Every GPU goal in one short run (issues 21, 31, 32), sized for one lent H100/H200: at most 9 minutes.
#
#   bash benchmarks/gpu_campaign.sh OUTDIR [--pipeline-wheels DIR] [--peer-wheels DIR]   # on the GPU machine
#   bash benchmarks/campaign_wheels.sh WHEELS   # before, where pip reaches PyPI: WHEELS/pipeline, WHEELS/peers
#   bash benchmarks/gpu_campaign.sh OUTDIR --dry-run                                     # every part, tiny, on a CPU
#                                                       (the pipeline part beside the others: it mostly waits)
#
# Parts, in the order of what we know least, each under its own timeout (so one that fails or hangs leaves the
# others' results), all together bounded to 540 s (a part gets what is left when its turn comes):
#   pipeline  python benchmarks/campaign_pipeline.py: `xlp run campaign_gpu` (xlstm_large ~126M, embedded corpus,
#             bf16, train.compile, ZeRO-1 on one NCCL rank, Triton kernels), every stage; then the training
#             again, stopped by SIGTERM and resumed, bitwise equal; fails if a stage fell back to the
#             reference ops on CUDA (the wheels' install included)                                    210 s
#   train     python benchmarks/bench_train_step.py: xlstm_large_400m and llama_400m at B8xS2048 and
#             B2xS8192, eager and compiled (train.compile), bf16 autocast, fused AdamW; the rows in that
#             order, so a timeout loses the last (the 8k compiled ones)                             125 s
#   peers     python benchmarks/campaign_peers.py: the official mlstm_kernels chunkwise kernels and the
#             official xlstm package's xLSTM-large training step beside ours, in one process        90 s
#   decode    python benchmarks/bench_decode.py: batch-1 decode of xlstm_large_400m after 1k/16k tokens,
#             the fused step, with programmatic dependent launch (pdl) and the compiled step          60 s
#   kernels   python benchmarks/bench_kernels.py --check: every Triton kernel against float64        45 s
#   seqpar    python benchmarks/bench_sequence_parallel.py --device cuda: train.sequence_parallel 1 and 2 on
#             2 GPUs (NCCL, Triton), peak activation memory per rank, bytes exchanged, tokens/s at S=32k
#             and 8k; with fewer than 2 GPUs (`nvidia-smi -L`) nothing runs and the table says
#             "unmeasured (needs >= 2 GPUs, found K)"                                               60 s
# Then one table (benchmarks/campaign_table.py) of every figure against its goal, with the ratios.
# Files in OUTDIR (8, what a lent machine's $OUT gives back): campaign.log (command, commit, machine, a
# line `part<TAB>NAME<TAB>EXIT<TAB>SECONDS` per part, and the seqpar part's output, which has no file of its
# own), <part>.log for the other five parts, results.jsonl (one JSON line per measurement, "bench" says
# whose), table.md (the table). The run directory and the installed
# wheels go to CAMPAIGN_WORK (default: a new folder under /tmp, named in campaign.log; never deleted).
#
# What it needs: python3 with torch and triton, and no install of the project (benchmarks/_xlp_path.sh makes
# xlp.* importable). The pipeline part also needs the project's dependencies (Ray, DeepSpeed, OmegaConf,
# WebDataset, ...): importable already, or wheels in --pipeline-wheels DIR, installed offline into
# CAMPAIGN_WORK (benchmarks/campaign_wheels.py: only what this python lacks). The peers part needs
# mlstm_kernels and xlstm: importable, or --peer-wheels DIR (a folder filled beforehand: `pip download
# mlstm_kernels xlstm`, or benchmarks/campaign_wheels.sh, which fills both folders); without them the table
# says "peer not installed". PYTHON=... picks
# the interpreter; COMMIT=... names the commit measured when the copy has no .git. Exit status: 0 when
# every part exited 0.
set -uo pipefail
ARGS="$*"
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: bash benchmarks/gpu_campaign.sh OUTDIR [--dry-run] [--pipeline-wheels DIR] [--peer-wheels DIR]}
shift
DRY=0
PIPELINE_WHEELS=
PEER_WHEELS=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --pipeline-wheels) PIPELINE_WHEELS=$(cd "${2:?--pipeline-wheels needs a folder}" && pwd) || exit 2; shift ;;
    --peer-wheels) PEER_WHEELS=$(cd "${2:?--peer-wheels needs a folder}" && pwd) || exit 2; shift ;;
    *) echo "gpu_campaign.sh: unknown option $1 (--dry-run, --pipeline-wheels DIR, --peer-wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=${CAMPAIGN_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xlp-campaign.XXXXXX")}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
rm -f "$OUTDIR"/results.jsonl "$OUTDIR"/campaign.log
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
  echo "command: bash benchmarks/gpu_campaign.sh $ARGS"
  echo "commit: $COMMIT$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes, or no .git)')"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname 2>/dev/null), $(nproc 2>/dev/null) CPUs"
  echo "$XLP_SOURCE"
  echo "work: $WORK (the pipeline part's run directory, installed wheels)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUTDIR/campaign.log"

part() {  # part NAME BUDGET_S COMMAND...: run it under min(BUDGET, time left), log to OUTDIR/NAME.log
  # (PART_LOG=FILE: appended to FILE instead)
  local name=$1 budget=$2
  shift 2
  local now left limit rc log="$OUTDIR/$name.log" append=
  if [ -n "${PART_LOG:-}" ]; then log=$PART_LOG; append=-a; fi
  now=$(date +%s)
  left=$(( DEADLINE - now ))
  limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, no time left =="
    printf 'part\t%s\tskipped\t0\n' "$name" >> "$OUTDIR/campaign.log"
    return
  fi
  echo "== $name (limit ${limit}s; $(( now - T0 ))s so far) =="
  timeout -k 10 "$limit" "$@" 2>&1 | tee $append "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "!! $name TIMED OUT after ${limit}s"
  printf 'part\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - now ))" >> "$OUTDIR/campaign.log"
}

# The pipeline part's interpreter sees the project's dependencies: from --pipeline-wheels, installed here first
# (inside the part's time). XLP_CAMPAIGN_PART names the part to its processes.
pipeline() {
  if [ -n "$PIPELINE_WHEELS" ]; then
    "$PY" benchmarks/campaign_wheels.py "$PIPELINE_WHEELS" "$WORK/pipeline-site" || return 3
    export PYTHONPATH="$WORK/pipeline-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local why
  if ! why=$("$PY" -c 'import deepspeed, omegaconf, ray, webdataset' 2>&1); then
    echo "pipeline: the project's dependencies are not importable here: $(echo "$why" | tail -1)"
    echo "pipeline: install the project, or give --pipeline-wheels DIR (README, GPU campaign)"
    return 3
  fi
  "$PY" benchmarks/campaign_pipeline.py "$WORK/run" --json "$OUTDIR/results.jsonl" "$@"
}
peers() {
  if [ -n "$PEER_WHEELS" ]; then
    "$PY" benchmarks/campaign_wheels.py "$PEER_WHEELS" "$WORK/peer-site" || return 3
    export PYTHONPATH="$WORK/peer-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" benchmarks/campaign_peers.py --json "$OUTDIR/results.jsonl" "$@"
}
# Sequence parallelism needs 2 GPUs; a machine with fewer says so in results.jsonl (the table's line) and
# the part succeeds (the campaign on one lent GPU is complete).
seqpar() {
  local gpus
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  gpus=${gpus:-0}
  if [ "$gpus" -lt 2 ]; then
    echo "seqpar: unmeasured (needs >= 2 GPUs, found $gpus)"
    printf '{"bench": "seqpar", "status": "unmeasured (needs >= 2 GPUs, found %d)", "gpus": %d}\n' "$gpus" "$gpus" \
      >> "$OUTDIR/results.jsonl"
    return 0
  fi
  "$PY" benchmarks/bench_sequence_parallel.py --device cuda --sp 1 2 --seq 32768 8192 --steps 2 \
    --json "$OUTDIR/results.jsonl" "$@"
}
export -f pipeline peers seqpar
export PY OUTDIR WORK PIPELINE_WHEELS PEER_WHEELS
RESULTS=(--json "$OUTDIR/results.jsonl")

if [ $DRY -eq 1 ]; then
  # tiny models on the CPU: the same commands, options and files, seconds instead of minutes (one training
  # shape: a second costs as much again and runs no other code)
  # The pipeline part mostly waits (Ray's start, each rank's imports, the runner's polls): here it runs beside
  # the others, its output shown when it ends (on the GPU every part has the card to itself, one at a time).
  # Its limit is about ten times what it takes alone (three `xlp run`s, ~85 s): in the test suite, beside three
  # other test processes on 2 cores, its ranks run under Ray at nice 15 behind the others' and took 310 s for
  # one training once (the part then ran out of its 480 s). It uses little CPU: the wait costs nothing.
  part pipeline 800 env XLP_CAMPAIGN_PART=pipeline bash -c 'pipeline --dry-run' > "$WORK/pipeline.out" 2>&1 &
  BESIDE=$!
  part train 150 env XLP_CAMPAIGN_PART=train "$PY" benchmarks/bench_train_step.py --models tiny_xlstm_large,tiny_llama \
    --device cpu --compile-backend aot_eager --vocab-size 512 --steps 1 --warmup 1 --shape 2x64 "${RESULTS[@]}"
  part peers 60 env XLP_CAMPAIGN_PART=peers bash -c 'peers --dry-run'
  part decode 120 env XLP_CAMPAIGN_PART=decode "$PY" benchmarks/bench_decode.py --model tiny_xlstm_large --device cpu \
    --vocab-size 512 --contexts 16,32 --new-tokens 4 --warmup 1 --fused --variant pdl:pdl=true \
    --variant compiled:fused=false "${RESULTS[@]}"
  part kernels 120 env XLP_CAMPAIGN_PART=kernels TRITON_INTERPRET=1 "$PY" benchmarks/bench_kernels.py --check-cpu
  # on a CPU: only the GPU count is checked ("unmeasured"); with 2 GPUs, short rows
  PART_LOG="$OUTDIR/campaign.log" part seqpar 60 env XLP_CAMPAIGN_PART=seqpar bash -c 'seqpar --seq 1024 --steps 1'
  wait "$BESIDE"
  cat "$WORK/pipeline.out"
else
  part pipeline 210 env XLP_CAMPAIGN_PART=pipeline bash -c 'pipeline'
  part train 125 env XLP_CAMPAIGN_PART=train "$PY" benchmarks/bench_train_step.py --models xlstm_large_400m,llama_400m \
    --modes eager,compiled --steps 6 --warmup 2 --shape 8x2048 --shape 2x8192 "${RESULTS[@]}"
  part peers 90 env XLP_CAMPAIGN_PART=peers bash -c 'peers'
  part decode 60 env XLP_CAMPAIGN_PART=decode "$PY" benchmarks/bench_decode.py --model xlstm_large_400m \
    --contexts 1024,16384 --new-tokens 64 --fused --variant pdl:pdl=true --variant compiled:fused=false "${RESULTS[@]}"
  part kernels 45 env XLP_CAMPAIGN_PART=kernels "$PY" benchmarks/bench_kernels.py --check
  PART_LOG="$OUTDIR/campaign.log" part seqpar 60 env XLP_CAMPAIGN_PART=seqpar bash -c 'seqpar'
fi

echo "== table ($(( $(date +%s) - T0 ))s so far) =="
"$PY" benchmarks/campaign_table.py "$OUTDIR" | tee "$OUTDIR/table.md"
echo "campaign: $(( $(date +%s) - T0 ))s in all; logs in $OUTDIR"
awk -F'\t' '$1 == "part" && $3 != "0" { bad = 1 } END { exit bad }' "$OUTDIR/campaign.log"
