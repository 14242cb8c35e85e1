"""Ops of the fused one-token decode step (batch of single tokens): each reads its weights once and
does the small work around the product in the same pass, so a step of an xLSTM-large block is five
kernels on GPU. These are the oracles for kernels/triton/decode.py; everything is computed in
float32 (float64 for float64 inputs) and returned in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from xlp.kernels.reference.common import compute_dtype
from xlp.kernels.reference.mlstm import MLSTMState


def _rms_normed(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    xf = x.to(dtype)
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(dtype)


def decode_linear(
    x: Tensor,
    weight: Tensor,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-6,
    bias: Optional[Tensor] = None,
    glu: bool = False,
    soft_cap: float = 0.0,
    residual: Optional[Tensor] = None,
    pdl: bool = False,
) -> Tensor:
    """y = epilogue(prologue(x) @ weight^T + bias) for x (B, K), weight (N, K).

    prologue: RMSNorm with `norm_weight` (if given). epilogue, in this order: glu (the first N/2
    outputs are the gate: silu(gate) * up, (B, N/2)), soft cap (cap * tanh(y / cap), 0 = off),
    + residual (B, N or N/2). Returns x's dtype. `pdl` is a launch option of the Triton kernel
    (no effect here)."""
    dtype = compute_dtype(x, weight)
    xf = _rms_normed(x, norm_weight, norm_eps, dtype) if norm_weight is not None else x.to(dtype)
    y = xf @ weight.to(dtype).T
    if bias is not None:
        y = y + bias.to(dtype)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if soft_cap:
        y = soft_cap * torch.tanh(y / soft_cap)
    if residual is not None:
        y = residual.to(dtype) + y
    return y.to(x.dtype)


def mlstm_decode_mix(
    x: Tensor,
    qkvo: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    state: MLSTMState,
    *,
    num_heads: int,
    norm_weight: Tensor,
    norm_eps: float,
    gate_soft_cap: float,
    head_norm_weight: Tensor,
    head_norm_eps: float,
    head_norm: str = "layer",
    pdl: bool = False,
    mix: Optional[tuple[int, int]] = None,
) -> Tensor:
    """The mLSTM cell of an xLSTM-large block for one token, from the block input x (B, D) and its
    projections qkvo (B, 2 DQK + 2 DV) = [q | k | v | o] (DQK, DV summed over heads).

    Gates from RMSNorm(x): [i~ | f~] = soft_cap(x_n gate_weight^T + gate_bias) (B, 2 NH); the
    stabilised mLSTM step (xLSTM eqs. 15-21) updates state = (C (B, NH, dqk, dv), n, m) IN PLACE;
    returns sigmoid(o) * head_norm(h) (B, DV) in x's dtype (head_norm "layer" or "rms", per head,
    then the per-channel weight). `pdl` and `mix` are launch options of the Triton kernel (no effect
    here)."""
    C, n, m = state
    B, NH = x.shape[0], num_heads
    dqk, dv = C.shape[-2], C.shape[-1]
    dtype = compute_dtype(x, C)
    pre = _rms_normed(x, norm_weight, norm_eps, dtype) @ gate_weight.to(dtype).T + gate_bias.to(dtype)
    if gate_soft_cap:
        pre = gate_soft_cap * torch.tanh(pre / gate_soft_cap)
    i, f = pre[:, :NH], pre[:, NH:]
    qkvo = qkvo.to(dtype)
    q = qkvo[:, : NH * dqk].view(B, NH, dqk)
    k = qkvo[:, NH * dqk: 2 * NH * dqk].view(B, NH, dqk) * dqk**-0.5
    v = qkvo[:, 2 * NH * dqk: 2 * NH * dqk + NH * dv].view(B, NH, dv)
    o = qkvo[:, 2 * NH * dqk + NH * dv:]
    m_prev = m.to(dtype)
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m_prev, i)  # eq. (15)
    f_s = torch.exp(log_f + m_prev - m_new)  # eq. (17)
    i_s = torch.exp(i - m_new)  # eq. (16)
    C_new = f_s[..., None, None] * C.to(dtype) + i_s[..., None, None] * (k[..., :, None] * v[..., None, :])  # eq. (19)
    n_new = f_s[..., None] * n.to(dtype) + i_s[..., None] * k  # eq. (20)
    num = (q[..., :, None] * C_new).sum(-2)
    den = (q * n_new).sum(-1)
    h = num / torch.maximum(den.abs(), torch.exp(-m_new))[..., None]  # eq. (21)
    if head_norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + head_norm_eps)
    else:
        mu = h.mean(-1, keepdim=True)
        h = (h - mu) * torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + head_norm_eps)
    out = torch.sigmoid(o) * h.reshape(B, NH * dv) * head_norm_weight.to(dtype)
    C.copy_(C_new)
    n.copy_(n_new)
    m.copy_(m_new)
    return out.to(x.dtype)
