#!/usr/bin/env bash
# One-shot GPU decode check (issue 9), sized for a lent H100 (~16 minutes at most, all steps; name the steps to fit a lease): batch-1
# decode tokens/s of xlstm_large_400m (bf16) after 1k/4k/16k-token prompts. Steps:
#   fused              in one process, interleaved on the same prompts: the hand-fused xlstm_large step
#                      (kernels/triton/decode.py) in a CUDA graph (--fused); the same with programmatic dependent
#                      launch (variant pdl, pdl=true: each kernel streams its first weight tile while its
#                      predecessor finishes); and the compiled step (variant compiled), with a profile of each;
#                      and, with PDL, the state update with its whole C in one tile (8 warps) and in 64 KB
#                      tiles (16 warps) instead of the choice timed on the kernel alone
#   graph              eager ops captured in a CUDA graph (--no-compile)
#   compiled           the torch.compile'd step in a CUDA graph (the default on CUDA), with a kernel profile;
#                      matrix-vector products written as inductor reductions (the default, matvec=reduce)
#   compiled_gemm      the same with cuBLAS matrix-vector products (--decode matvec=gemm)
#   compiled_tune      the same with inductor's coordinate-descent tuning (--decode tune=true)
#   compiled_autotune  inductor's max-autotune-no-cudagraphs mode (--decode compile_mode=...)
#   eager              plain eager steps (--no-graph --no-compile)
#   gencost            the eval stage's generation-cost table (xlstm_125m vs llama_125m, bf16, 1k-16k)
# Each bench also prints the decoder's logits against the plain eager model.step on the same state.
# (benchmarks/results/gpu_decode_h100.log predates the decode.* settings: it names them by their old
# environment variables, which benchmarks/results/README.md maps to the keys.)
# Usage (repo root, CUDA machine): bash benchmarks/gpu_decode_check.sh [STEP ...]   (logs to $OUT or /tmp)
# Needs python with torch and triton; the project need not be installed (benchmarks/_xlp_path.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -d .devcarry/site ]; then export PYTHONPATH="$PWD/.devcarry/site${PYTHONPATH:+:$PYTHONPATH}"; fi
source benchmarks/_xlp_path.sh
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOGDIR=${OUT:-/tmp}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "$XLP_SOURCE"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
run() {  # run NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(( $(date +%s) - t0 ))s so far) =="
  timeout "$limit" "$PY" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local r=${PIPESTATUS[0]}
  [ "$r" -ne 0 ] && { echo "!! $name exited $r"; rc=1; }
}
# BENCH_ARGS replaces the model arguments, e.g. for a dry run of the script on CPU:
#   BENCH_ARGS="--model tiny_xlstm_large --contexts 64,128 --new-tokens 8 --vocab-size 512 --device cpu" bash benchmarks/gpu_decode_check.sh fused
M="benchmarks/bench_decode.py ${BENCH_ARGS:---model xlstm_large_400m}"
for step in ${@:-fused graph compiled_gemm compiled_tune compiled_autotune eager gencost}; do
  case $step in
    graph) run decode_graph 100 $M --no-compile ;;
    fused) TRITON_PRINT_AUTOTUNING=1 run decode_fused 360 $M --fused --profile \
             --variant pdl:pdl=true --variant compiled:fused=false \
             --variant pdl_whole8:pdl=true,mix=32768x8 \
             --variant pdl_tiles16:pdl=true,mix=16384x16 ;;
    compiled) run decode_compiled 110 $M --profile ;;
    compiled_gemm) run decode_compiled_gemm 110 $M --profile --decode matvec=gemm ;;
    compiled_tune) run decode_compiled_tune 170 $M --profile --decode tune=true ;;
    compiled_autotune) run decode_compiled_autotune 200 $M --decode compile_mode=max-autotune-no-cudagraphs ;;
    eager) run decode_eager 70 $M --no-graph --no-compile ;;
    gencost) run gencost 70 -P -m xlp.pipeline.eval.gencost --models xlstm_125m llama_125m --dtype bf16 --contexts 1024 4096 16384 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "== summary ($(( $(date +%s) - t0 ))s total) =="
for f in "$LOGDIR"/decode_*.log; do echo "-- $(basename "$f")"; grep -hE "^(compile options|fused step|decode:|variant|context|ms/token|profile|mlstm_decode_mix:|FAILED)|Error|Traceback" "$f" | cut -c1-250; done
exit $rc
