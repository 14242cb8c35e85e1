"""Reference normalisations over the last dimension, computed in float32 (float64 for float64 inputs)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlp.kernels.reference.common import compute_dtype


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, over the last dim.

    x: (..., D); weight: (D,) or None. Returns x's dtype."""
    dtype = compute_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.to(dtype)
    return y.to(x.dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """LayerNorm (Ba et al., 2016) over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    x: (..., D); weight, bias: (D,) or None. Returns x's dtype."""
    dtype = compute_dtype(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype)
        mu = xf.mean(dim=-1, keepdim=True)
        var = (xf - mu).pow(2).mean(dim=-1, keepdim=True)
        y = (xf - mu) * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
    return y.to(x.dtype)
