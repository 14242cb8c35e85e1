"""Fused linear + cross-entropy: the LM head and the loss without the (N, V) fp32 logits.

Rows are processed in chunks of `rows_per_chunk` (so at most chunk x V logits exist at a time, in the
input dtype). Per chunk: logits = hidden_chunk @ W^T (cuBLAS), then one Triton kernel streams each
row over the vocabulary twice -- online max/logsumexp, then the gradient softmax - onehot (times the
soft-cap derivative and 1/count) written in place over the logits -- and two matmuls turn that into
d hidden (chunk) and accumulate d W (fp32). The gradients are thus computed in the forward pass (the
loss is a scalar, so backward only scales them by the incoming gradient); without grad they are skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xlp.kernels.triton._common import check_device, kernel_dtype


@triton.jit
def _ce_kernel(
    LOGITS, TGT, LOSS, V, stride, ignore_index, inv_count, soft_cap,
    BV: tl.constexpr, HAS_CAP: tl.constexpr, GRAD: tl.constexpr,
):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride
    tgt = tl.load(TGT + row)
    mx = -float("inf")
    se = 0.0
    xt = 0.0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        cm = cols < V
        z = tl.load(base + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_CAP:
            z = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * z / soft_cap)) - 1.0)  # c * tanh(z / c)
        z = tl.where(cm, z, -float("inf"))
        new_mx = tl.maximum(mx, tl.max(z, axis=0))
        se = se * tl.exp(mx - new_mx) + tl.sum(tl.exp(z - new_mx), axis=0)
        mx = new_mx
        xt += tl.sum(tl.where(cols == tgt, z, 0.0), axis=0)
    lse = mx + tl.log(se)
    valid = tgt != ignore_index
    tl.store(LOSS + row, tl.where(valid, lse - xt, 0.0))
    if GRAD:
        scale = tl.where(valid, inv_count, 0.0)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cm = cols < V
            z = tl.load(base + cols, mask=cm, other=0.0).to(tl.float32)
            if HAS_CAP:
                t = 2.0 / (1.0 + tl.exp(-2.0 * z / soft_cap)) - 1.0
                x = soft_cap * t
            else:
                x = z
            gr = (tl.exp(x - lse) - tl.where(cols == tgt, 1.0, 0.0)) * scale
            if HAS_CAP:
                gr = gr * (1.0 - t * t)
            tl.store(base + cols, gr.to(LOGITS.dtype.element_ty), mask=cm)


def _rows_per_chunk(N: int, V: int, D: int) -> int:
    # keep a chunk's logits around 256 MiB of bf16 (or N if smaller), at least 1 row
    return max(1, min(N, (128 * 1024 * 1024) // max(V, 1)))


@torch.library.custom_op("xlp_triton::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, soft_cap: float, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    N, D = hidden.shape
    V = weight.shape[0]
    count = int((targets != ignore_index).sum().clamp(min=1))
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_grad else hidden.new_empty(0)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_grad else hidden.new_empty(0)
    R = _rows_per_chunk(N, V, D)
    BV = min(triton.next_power_of_2(V), 4096 if hidden.is_cuda else 1024)
    for r0 in range(0, N, R):
        h = hidden[r0 : r0 + R]
        logits = (h @ weight.t()).contiguous()  # (R, V) in the input dtype
        _ce_kernel[(h.shape[0],)](
            logits, targets[r0 : r0 + R], loss_rows[r0 : r0 + R], V, logits.stride(0), ignore_index,
            1.0 / count, float(soft_cap), BV=BV, HAS_CAP=soft_cap > 0, GRAD=need_grad, num_warps=8,
        )
        if need_grad:
            dh[r0 : r0 + R] = logits @ weight
            dw += (logits.t() @ h).float()
    loss = loss_rows.sum() / count
    return loss, dh, dw


@_lce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, soft_cap, need_grad):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    if need_grad:
        return hidden.new_empty((), **f32), torch.empty_like(hidden), hidden.new_empty(V, D, **f32)
    return hidden.new_empty((), **f32), hidden.new_empty(0), hidden.new_empty(0)


def _setup(ctx, inputs, output):
    hidden, weight, *_ = inputs
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.wdtype = weight.dtype
    ctx.mark_non_differentiable(dh, dw)


def _bwd(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    if dh.numel() == 0:
        raise RuntimeError("linear_cross_entropy: forward ran without grad; cannot backward")
    return (dh * dloss.to(dh.dtype)), (dw * dloss).to(ctx.wdtype), None, None, None, None


_lce_fwd.register_autograd(_bwd, setup_context=_setup)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    soft_cap: Optional[float] = None,
) -> Tensor:
    """Triton fused linear + cross-entropy; same arguments and result as the reference."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden (..., D) and targets (...) disagree: {tuple(hidden.shape)} vs {tuple(targets.shape)}")
    check_device(hidden, weight)
    kd = kernel_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(kd).contiguous()
    w = weight.to(kd).contiguous()
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _, _ = _lce_fwd(h, w, targets.reshape(-1).contiguous(), int(ignore_index), float(soft_cap or 0.0), need_grad)
    return loss.to(torch.float64) if hidden.dtype == torch.float64 else loss
