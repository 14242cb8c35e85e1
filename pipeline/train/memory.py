"""Whether a training step can fit this machine's memory, checked before CPU ranks start.

A micro-batch of B rows of S tokens keeps activations for its backward pass that grow with B x S
(xlp.xlstm_model.counts.ActivationBytes measures them on the model at short lengths). A rank needs at
least its process, weights and gradients, those activations and the least the backward pass adds to
them. When the ranks of this machine need more than it has available, the step cannot run: without
this check the ranks grow until Ray's memory monitor (or the kernel) kills them, with a message that
names no key. It is refused instead, naming train.micro_batch_size, data.seq_len and values that fit
with room for the backward pass (PEAK times the activations).

GPU ranks are not checked here: their activations come from other kernels, and CUDA's own
out-of-memory error stops them at the first step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from xlp.pipeline.core.config import section
from xlp.pipeline.train.trainer import resolve_vocab_size
from xlp.xlstm_model import ActivationBytes, build_model

# A step's peak over the activations kept for backward, measured on the tiny xLSTM on CPU (peak RSS
# growth of forward + backward / saved activations: 1.37 at 4 x 1000 tokens): what suggested values
# leave room for.
PEAK = 1.5
# Measuring costs forward passes; it is skipped when even this many bytes per token per d_model per
# block (7x the tiny xLSTM's 276 on CPU), plus 8 per vocabulary entry (the logits the reference loss
# holds), would fit.
GENEROUS_BYTES = 2000
# What a rank process holds before any tensor of its own: Python with torch and DeepSpeed imported
# (293 MiB measured)
PROCESS = 288 << 20
# The least a step's peak exceeds the activations it keeps, measured on CPU at 4 x 2000 tokens (peak RSS
# growth of forward + backward over the activations): 1.09 (tiny xLSTM-large) to 1.37 (tiny xLSTM)
BACKWARD_MIN = 1.05
GiB = 1 << 30


def available_bytes() -> Optional[int]:
    """MemAvailable of this machine (Linux), None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_measured_models: dict[str, tuple[int, ActivationBytes]] = {}


def _measured(mcfg) -> tuple[int, ActivationBytes]:
    """(bytes of a rank's process, weights and gradients; its activations) for a model config, measured
    once per process (the probe builds the model and runs three short forward passes)."""
    key = repr(mcfg)
    if key not in _measured_models:
        model = build_model(mcfg)
        fixed = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) + PROCESS  # weights, gradients
        with torch.random.fork_rng():  # the probe must not move this process's RNG
            _measured_models[key] = fixed, ActivationBytes(model, probe_len=mcfg.mlstm_chunk_size)
    return _measured_models[key]


def refuse_if_it_cannot_fit(cfg, tokenizer_model: Path, ranks: int, available: Optional[int] = None) -> None:
    """ValueError naming the keys when `ranks` CPU ranks of this machine cannot hold the weights and one
    micro-batch's activations each in `available` bytes (default: MemAvailable now)."""
    available = available_bytes() if available is None else available
    if not available:
        return
    mcfg = section(cfg, "model")
    mcfg.vocab_size = resolve_vocab_size(mcfg, tokenizer_model)
    # a rank holds seq_len / train.sequence_parallel tokens of each row (the summaries it exchanges are small)
    sp = max(1, int(cfg.train.get("sequence_parallel", 1) or 1))
    B, S = int(cfg.train.micro_batch_size), int(cfg.data.seq_len) // sp
    d, L, V = mcfg.d_model, mcfg.num_blocks, mcfg.vocab_size
    generous = B * S * (GENEROUS_BYTES * d * L + 8 * V) + 8 * (32 * d * d * L + 2 * V * d) + PROCESS
    if ranks * generous <= available:
        return
    fixed, act = _measured(mcfg)
    need = ranks * (fixed + BACKWARD_MIN * act(B, S))
    if need <= available:
        return
    per_rank = available / ranks
    fixes = []
    rows = int((per_rank - fixed - PEAK * (act.a + act.b * S)) // (PEAK * act.c * S)) if act.c > 0 else 0
    if 1 <= rows < B:
        fixes.append(f"train.micro_batch_size={rows} (raise train.grad_accum to keep the batch)")
    per_token = PEAK * (act.b + act.c * B)
    tokens = int((per_rank - fixed - PEAK * act.a) // per_token) if per_token > 0 else 0
    if tokens >= 64:
        fixes.append(f"data.seq_len={tokens // 64 * 64 * sp}")
    if not mcfg.activation_checkpointing:
        fixes.append("model.activation_checkpointing=true")
    if ranks > 1:
        fixes.append(f"fewer ranks (train.cpu_processes, now {ranks})")
    raise ValueError(
        f"train.micro_batch_size={B} rows of data.seq_len={S * sp} tokens"
        + (f" ({S} a rank, train.sequence_parallel={sp})" if sp > 1 else "")
        + f" cannot fit this machine's memory: {ranks} "
        f"rank(s) x ({fixed / GiB:.2f} GiB for the process, weights and gradients + {act(B, S) / GiB:.1f} GiB of "
        f"activations kept for the backward pass, and {BACKWARD_MIN - 1:.0%} more while it runs) = {need / GiB:.1f} GiB "
        f"at least, and {available / GiB:.1f} GiB is "
        f"available. Set {', or '.join(fixes)}")
