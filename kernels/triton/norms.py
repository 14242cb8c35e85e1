"""Fused RMSNorm / LayerNorm over the last dimension, forward and backward, fp32 statistics.

Forward: one program per block of rows, the whole row in registers (D <= 16k), saves 1/rms (and the
mean for LayerNorm). Backward: dx in one pass per row; dweight/dbias as per-program partial sums
(one row of partials per program, summed in PyTorch: deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xlp.kernels.triton._common import check_device, kernel_dtype


@triton.jit
def _norm_fwd_kernel(
    X, W, B_, Y, MEAN, RSTD, N, D, eps,
    BD: tl.constexpr, ROWS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, LN: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(B_ + cols, mask=cmask, other=0.0).to(tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        if row < N:
            x = tl.load(X + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            if LN:
                mu = tl.sum(x, axis=0) / D
                x = tl.where(cmask, x - mu, 0.0)
                tl.store(MEAN + row, mu)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
            tl.store(RSTD + row, rstd)
            y = x * rstd
            if HAS_W:
                y = y * w
            if HAS_B:
                y = y + bb
            tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, MEAN, RSTD, DX, DWP, DBP, N, D,
    BD: tl.constexpr, ROWS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, LN: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        if row < N:
            x = tl.load(X + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if LN:
                x = tl.where(cmask, x - tl.load(MEAN + row), 0.0)
            xhat = x * rstd
            if HAS_W:
                dw += dy * xhat
                dyw = dy * w
            else:
                dyw = dy
            if HAS_B:
                db += dy
            c1 = tl.sum(dyw * xhat, axis=0) / D
            if LN:
                c2 = tl.sum(dyw, axis=0) / D
                dx = (dyw - c2 - xhat * c1) * rstd
            else:
                dx = (dyw - xhat * c1) * rstd
            tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=cmask)
    if HAS_W:
        tl.store(DWP + pid * D + cols, dw, mask=cmask)
    if HAS_B:
        tl.store(DBP + pid * D + cols, db, mask=cmask)


def _cfg(D: int) -> tuple[int, int, int]:
    BD = triton.next_power_of_2(D)
    num_warps = min(max(BD // 256, 1), 16)
    return BD, num_warps, 4


@torch.library.custom_op("xlp_triton::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, ln: bool
) -> tuple[Tensor, Tensor, Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    N = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    BD, nw, ROWS = _cfg(D)
    _norm_fwd_kernel[(triton.cdiv(N, ROWS),)](
        x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd, N, D, eps,
        BD=BD, ROWS=ROWS, HAS_W=weight is not None, HAS_B=bias is not None, LN=ln, num_warps=nw,
    )
    return y.view(x.shape), mean, rstd


@_norm_fwd.register_fake
def _(x, weight, bias, eps, ln):
    # contiguous like the real output (new_empty, not empty_like: x may be a transposed view, and a
    # compiled graph that believed y had x's strides would view it wrongly)
    N = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("xlp_triton::norm_bwd", mutates_args=())
def _norm_bwd(
    x: Tensor, weight: Optional[Tensor], has_bias: bool, dy: Tensor, mean: Tensor, rstd: Tensor, ln: bool
) -> tuple[Tensor, Tensor, Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    dy2 = dy.reshape(-1, D).contiguous()
    N = x2.shape[0]
    BD, nw, _ = _cfg(D)
    ROWS = max(4, triton.cdiv(N, 1024))  # enough rows per program to keep the partial sums short
    P = triton.cdiv(N, ROWS)
    dx = torch.empty_like(x2)
    dwp = torch.zeros(P if weight is not None else 1, D, dtype=torch.float32, device=x.device)
    dbp = torch.zeros(P if has_bias else 1, D, dtype=torch.float32, device=x.device)
    _norm_bwd_kernel[(P,)](
        x2, weight if weight is not None else x2, dy2, mean, rstd, dx, dwp, dbp, N, D,
        BD=BD, ROWS=ROWS, HAS_W=weight is not None, HAS_B=has_bias, LN=ln, num_warps=nw,
    )
    return dx.view(x.shape), dwp.sum(0), dbp.sum(0)


@_norm_bwd.register_fake
def _(x, weight, has_bias, dy, mean, rstd, ln):
    D = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(D, dtype=torch.float32), x.new_empty(D, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, ln = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.ln = ln
    ctx.wdtype = None if weight is None else weight.dtype
    ctx.bdtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _bwd(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd(x, weight, ctx.has_bias, dy, mean, rstd, ctx.ln)
    dw = dw.to(ctx.wdtype) if ctx.wdtype is not None else None
    db = db.to(ctx.bdtype) if ctx.has_bias else None
    return dx, dw, db, None, None


_norm_fwd.register_autograd(_bwd, setup_context=_setup)


def _prep(x: Tensor, *params: Optional[Tensor]):
    kd = kernel_dtype(x.dtype)
    return (x.to(kd),) + tuple(None if p is None else p.contiguous() for p in params)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """Triton RMSNorm; same arguments and result as xlp.kernels.reference.norms.rms_norm."""
    check_device(x)
    xk, w = _prep(x, weight)
    return _norm_fwd(xk, w, None, float(eps), False)[0].to(x.dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """Triton LayerNorm; same arguments and result as xlp.kernels.reference.norms.layer_norm."""
    check_device(x)
    xk, w, b = _prep(x, weight, bias)
    return _norm_fwd(xk, w, b, float(eps), True)[0].to(x.dtype)
