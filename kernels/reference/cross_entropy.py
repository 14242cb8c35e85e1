"""Reference linear + cross-entropy: the LM head and the loss in one call.

A fused kernel can compute this chunk by chunk without ever holding the (N, V) logits; the
reference simply materialises them (float32 for the softmax, whatever the input dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from xlp.kernels.reference.common import compute_dtype


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    soft_cap: Optional[float] = None,
) -> Tensor:
    """Mean cross-entropy of logits = hidden @ weight^T against targets, over targets != ignore_index.

    hidden: (..., D); weight: (V, D); targets: (...) int64. With soft_cap c the logits are
    c * tanh(logits / c) first (xLSTM 7B output soft-capping). Returns a float32 scalar (float64 for
    float64 inputs); 0 when every target is ignored (rather than the 0/0 = NaN of a plain mean).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden (..., D) and targets (...) disagree: {tuple(hidden.shape)} vs {tuple(targets.shape)}")
    dtype = compute_dtype(hidden, weight)
    # The matmul runs in the ambient (possibly autocast) precision like an nn.Linear head would;
    # softmax and the loss run in float32.
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if soft_cap:
            logits = soft_cap * torch.tanh(logits / soft_cap)
        flat = targets.reshape(-1)
        total = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
        count = (flat != ignore_index).sum().clamp(min=1)
    return total / count
