"""Triton sLSTM: the whole recurrence in one kernel launch, forward and backward, no C++/CUDA build.

One program per (batch, head) walks the sequence; the state (h, c, n, m) stays in registers, and the
head's recurrent block R[:, head] (4 x DH x DH) is held in registers too when DH <= 64 (else it is
re-read from L2 each step). The backward walks the sequence in reverse with the same layout,
recomputing each step's gates from the saved states, and writes the gate pre-activation gradients;
dR = sum_t h_{t-1}^T dgates_t is then one batched matmul in PyTorch (tensor cores, no register
accumulators). Equations: kernels/reference/slstm.py (xLSTM eqs. (8)-(17)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xlp.kernels.reference.common import doc_starts_mask
from xlp.kernels.reference.slstm import _check
from xlp.kernels.triton._common import check_device, kernel_dtype

NEG_INF = tl.constexpr(float("-inf"))  # constexpr: readable inside @triton.jit kernels


@triton.jit
def _load_r(R, gate, hd, NH, DH, BD: tl.constexpr):
    d = tl.arange(0, BD)
    msk = (d[:, None] < DH) & (d[None, :] < DH)
    return tl.load(R + ((gate * NH + hd) * DH + d[:, None]) * DH + d[None, :], mask=msk, other=0.0).to(tl.float32)


@triton.jit
def _log_forget(x, EXP_F: tl.constexpr):
    if EXP_F:
        return x
    else:
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _slstm_fwd_kernel(
    GX, R, RESET, H0, C0, N0, M0,
    HOUT, HS, CS, NS, MS, HF, CF, NF, MF,
    S, NH, DH,
    BD: tl.constexpr, EXP_F: tl.constexpr, R_REG: tl.constexpr, HAS_RESET: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NH
    hd = pid % NH
    d = tl.arange(0, BD)
    dm = d < DH
    st = pid * DH + d
    h = tl.load(H0 + st, mask=dm, other=0.0)
    c = tl.load(C0 + st, mask=dm, other=0.0)
    n = tl.load(N0 + st, mask=dm, other=0.0)
    m = tl.load(M0 + st, mask=dm, other=0.0)
    if R_REG:
        Ri = _load_r(R, 0, hd, NH, DH, BD)
        Rf = _load_r(R, 1, hd, NH, DH, BD)
        Rz = _load_r(R, 2, hd, NH, DH, BD)
        Ro = _load_r(R, 3, hd, NH, DH, BD)
    for t in range(S):
        if HAS_RESET:
            r = tl.load(RESET + b * S + t) != 0
            h = tl.where(r, 0.0, h)
            c = tl.where(r, 0.0, c)
            n = tl.where(r, 0.0, n)
            m = tl.where(r, NEG_INF, m)
        if not R_REG:
            Ri = _load_r(R, 0, hd, NH, DH, BD)
            Rf = _load_r(R, 1, hd, NH, DH, BD)
            Rz = _load_r(R, 2, hd, NH, DH, BD)
            Ro = _load_r(R, 3, hd, NH, DH, BD)
        gbase = GX + (((b * S + t) * 4) * NH + hd) * DH + d
        hc = h[:, None]
        ri = tl.load(gbase, mask=dm, other=0.0).to(tl.float32) + tl.sum(hc * Ri, axis=0)
        rf = tl.load(gbase + NH * DH, mask=dm, other=0.0).to(tl.float32) + tl.sum(hc * Rf, axis=0)
        rz = tl.load(gbase + 2 * NH * DH, mask=dm, other=0.0).to(tl.float32) + tl.sum(hc * Rz, axis=0)
        ro = tl.load(gbase + 3 * NH * DH, mask=dm, other=0.0).to(tl.float32) + tl.sum(hc * Ro, axis=0)
        lf = _log_forget(rf, EXP_F)
        m_new = tl.maximum(lf + m, ri)
        i_s = tl.exp(ri - m_new)
        f_s = tl.exp(lf + m - m_new)
        z = 2.0 / (1.0 + tl.exp(-2.0 * rz)) - 1.0
        o = 1.0 / (1.0 + tl.exp(-ro))
        c = f_s * c + i_s * z
        n = f_s * n + i_s
        h = o * (c / n)
        m = m_new
        ob = ((b * S + t) * NH + hd) * DH + d
        tl.store(HOUT + ob, h.to(HOUT.dtype.element_ty), mask=dm)
        tl.store(HS + ob, h, mask=dm)
        tl.store(CS + ob, c, mask=dm)
        tl.store(NS + ob, n, mask=dm)
        tl.store(MS + ob, m, mask=dm)
    tl.store(HF + st, h, mask=dm)
    tl.store(CF + st, c, mask=dm)
    tl.store(NF + st, n, mask=dm)
    tl.store(MF + st, m, mask=dm)


@triton.jit
def _slstm_bwd_kernel(
    GX, R, RESET, H0, C0, N0, M0, HS, CS, NS, MS, DHOUT, DHF, DCF, DNF, DMF,
    DGX, DH0, DC0, DN0, DM0,
    S, NH, DH,
    BD: tl.constexpr, EXP_F: tl.constexpr, R_REG: tl.constexpr, HAS_RESET: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NH
    hd = pid % NH
    d = tl.arange(0, BD)
    dm_ = d < DH
    st = pid * DH + d
    dh_c = tl.load(DHF + st, mask=dm_, other=0.0)
    dc_c = tl.load(DCF + st, mask=dm_, other=0.0)
    dn_c = tl.load(DNF + st, mask=dm_, other=0.0)
    dm_c = tl.load(DMF + st, mask=dm_, other=0.0)
    if R_REG:
        Ri = _load_r(R, 0, hd, NH, DH, BD)
        Rf = _load_r(R, 1, hd, NH, DH, BD)
        Rz = _load_r(R, 2, hd, NH, DH, BD)
        Ro = _load_r(R, 3, hd, NH, DH, BD)
    for tt in range(S):
        t = S - 1 - tt
        if not R_REG:
            Ri = _load_r(R, 0, hd, NH, DH, BD)
            Rf = _load_r(R, 1, hd, NH, DH, BD)
            Rz = _load_r(R, 2, hd, NH, DH, BD)
            Ro = _load_r(R, 3, hd, NH, DH, BD)
        # state before step t
        pb = ((b * S + tl.maximum(t - 1, 0)) * NH + hd) * DH + d
        first = t == 0
        pm = dm_
        h = tl.where(first, tl.load(H0 + st, mask=dm_, other=0.0), tl.load(HS + pb, mask=pm, other=0.0))
        c = tl.where(first, tl.load(C0 + st, mask=dm_, other=0.0), tl.load(CS + pb, mask=pm, other=0.0))
        n = tl.where(first, tl.load(N0 + st, mask=dm_, other=0.0), tl.load(NS + pb, mask=pm, other=0.0))
        m = tl.where(first, tl.load(M0 + st, mask=dm_, other=0.0), tl.load(MS + pb, mask=pm, other=0.0))
        r = False
        if HAS_RESET:
            r = tl.load(RESET + b * S + t) != 0
            h = tl.where(r, 0.0, h)
            c = tl.where(r, 0.0, c)
            n = tl.where(r, 0.0, n)
            m = tl.where(r, NEG_INF, m)
        gbase = GX + (((b * S + t) * 4) * NH + hd) * DH + d
        hc = h[:, None]
        ri = tl.load(gbase, mask=dm_, other=0.0).to(tl.float32) + tl.sum(hc * Ri, axis=0)
        rf = tl.load(gbase + NH * DH, mask=dm_, other=0.0).to(tl.float32) + tl.sum(hc * Rf, axis=0)
        rz = tl.load(gbase + 2 * NH * DH, mask=dm_, other=0.0).to(tl.float32) + tl.sum(hc * Rz, axis=0)
        ro = tl.load(gbase + 3 * NH * DH, mask=dm_, other=0.0).to(tl.float32) + tl.sum(hc * Ro, axis=0)
        lf = _log_forget(rf, EXP_F)
        m_new = tl.maximum(lf + m, ri)
        i_s = tl.exp(ri - m_new)
        f_s = tl.exp(lf + m - m_new)
        z = 2.0 / (1.0 + tl.exp(-2.0 * rz)) - 1.0
        o = 1.0 / (1.0 + tl.exp(-ro))
        c1 = f_s * c + i_s * z
        n1 = f_s * n + i_s
        ob = ((b * S + t) * NH + hd) * DH + d
        dh = tl.load(DHOUT + ob, mask=dm_, other=0.0).to(tl.float32) + dh_c
        do = dh * c1 / n1
        dc1 = dc_c + dh * o / n1
        dn1 = dn_c - dh * o * c1 / (n1 * n1)
        dfs = dc1 * c + dn1 * n
        dis = dc1 * z + dn1
        dz = dc1 * i_s
        e1 = dfs * f_s
        e2 = dis * i_s
        dmn = dm_c - e1 - e2
        take_f = (lf + m) >= ri
        dlf = e1 + tl.where(take_f, dmn, 0.0)
        dm_prev = e1 + tl.where(take_f, dmn, 0.0)
        dri = e2 + tl.where(take_f, 0.0, dmn)
        if EXP_F:
            drf = dlf
        else:
            drf = dlf * (1.0 / (1.0 + tl.exp(rf)))  # d logsigmoid(x) / dx = sigmoid(-x)
        drz = dz * (1.0 - z * z)
        dro = do * o * (1.0 - o)
        dgb = DGX + (((b * S + t) * 4) * NH + hd) * DH + d
        tl.store(dgb, dri, mask=dm_)
        tl.store(dgb + NH * DH, drf, mask=dm_)
        tl.store(dgb + 2 * NH * DH, drz, mask=dm_)
        tl.store(dgb + 3 * NH * DH, dro, mask=dm_)
        dh_c = (
            tl.sum(Ri * dri[None, :], axis=1) + tl.sum(Rf * drf[None, :], axis=1)
            + tl.sum(Rz * drz[None, :], axis=1) + tl.sum(Ro * dro[None, :], axis=1)
        )
        dc_c = dc1 * f_s
        dn_c = dn1 * f_s
        dm_c = dm_prev
        if HAS_RESET:
            dh_c = tl.where(r, 0.0, dh_c)
            dc_c = tl.where(r, 0.0, dc_c)
            dn_c = tl.where(r, 0.0, dn_c)
            dm_c = tl.where(r, 0.0, dm_c)
    dm_c = tl.where(dm_c == dm_c, dm_c, 0.0)
    tl.store(DH0 + st, dh_c, mask=dm_)
    tl.store(DC0 + st, dc_c, mask=dm_)
    tl.store(DN0 + st, dn_c, mask=dm_)
    tl.store(DM0 + st, dm_c, mask=dm_)


def _cfg(DH: int) -> dict:
    BD = max(16, triton.next_power_of_2(DH))
    return dict(BD=BD, R_REG=BD <= 64, num_warps=4 if BD <= 64 else 8)


@torch.library.custom_op("xlp_triton::slstm_fwd", mutates_args=())
def _slstm_fwd(
    gates: Tensor, R: Tensor, reset: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor, exp_f: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, S, _, NH, DH = gates.shape
    dev = gates.device
    hout = torch.empty(B, S, NH, DH, dtype=gates.dtype, device=dev)
    hs, cs, ns, ms = (torch.empty(B, S, NH, DH, dtype=torch.float32, device=dev) for _ in range(4))
    hf, cf, nf, mf = (torch.empty(B, NH, DH, dtype=torch.float32, device=dev) for _ in range(4))
    _slstm_fwd_kernel[(B * NH,)](
        gates, R, reset, h0, c0, n0, m0, hout, hs, cs, ns, ms, hf, cf, nf, mf, S, NH, DH,
        EXP_F=exp_f, HAS_RESET=reset.numel() > 0, **_cfg(DH),
    )
    return hout, hf, cf, nf, mf, hs, cs, ns, ms


@_slstm_fwd.register_fake
def _(gates, R, reset, h0, c0, n0, m0, exp_f):
    B, S, _, NH, DH = gates.shape
    f32 = dict(dtype=torch.float32)
    big = [gates.new_empty(B, S, NH, DH, **f32) for _ in range(4)]
    small = [gates.new_empty(B, NH, DH, **f32) for _ in range(4)]
    return (gates.new_empty(B, S, NH, DH), *small, *big)


@torch.library.custom_op("xlp_triton::slstm_bwd", mutates_args=())
def _slstm_bwd(
    gates: Tensor, R: Tensor, reset: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
    hs: Tensor, cs: Tensor, ns: Tensor, ms: Tensor,
    dh: Tensor, dhf: Tensor, dcf: Tensor, dnf: Tensor, dmf: Tensor, exp_f: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, S, _, NH, DH = gates.shape
    dev = gates.device
    dgx = torch.empty(B, S, 4, NH, DH, dtype=torch.float32, device=dev)
    dh0, dc0, dn0, dm0 = (torch.empty(B, NH, DH, dtype=torch.float32, device=dev) for _ in range(4))
    _slstm_bwd_kernel[(B * NH,)](
        gates, R, reset, h0, c0, n0, m0, hs, cs, ns, ms, dh.contiguous(), dhf.contiguous(), dcf.contiguous(),
        dnf.contiguous(), dmf.contiguous(), dgx, dh0, dc0, dn0, dm0, S, NH, DH,
        EXP_F=exp_f, HAS_RESET=reset.numel() > 0, **_cfg(DH),
    )
    # dR[g, j] = sum_{b,t} h_{t-1}[b, j]^T dgates[b, t, g, j]  (h_{t-1}: the state the step read)
    hprev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)  # (B, S, NH, DH)
    if reset.numel() > 0:
        hprev = hprev.masked_fill(reset.bool()[:, :, None, None], 0.0)
    dR = torch.einsum("bsjd,bsgje->gjde", hprev, dgx).contiguous()  # as the fake says (einsum may permute)
    return dgx, dR, dh0, dc0, dn0, dm0


@_slstm_bwd.register_fake
def _(gates, R, reset, h0, c0, n0, m0, hs, cs, ns, ms, dh, dhf, dcf, dnf, dmf, exp_f):
    B, S, _, NH, DH = gates.shape
    f32 = dict(dtype=torch.float32)
    return (
        gates.new_empty(B, S, 4, NH, DH, **f32), R.new_empty(R.shape, **f32),
        *(gates.new_empty(B, NH, DH, **f32) for _ in range(4)),
    )


def _setup(ctx, inputs, output):
    gates, R, reset, h0, c0, n0, m0, exp_f = inputs
    hout, hf, cf, nf, mf, hs, cs, ns, ms = output
    ctx.save_for_backward(gates, R, reset, h0, c0, n0, m0, hs, cs, ns, ms)
    ctx.exp_f = exp_f
    ctx.mark_non_differentiable(hs, cs, ns, ms)


def _bwd(ctx, dh, dhf, dcf, dnf, dmf, *_):
    gates, R, reset, h0, c0, n0, m0, hs, cs, ns, ms = ctx.saved_tensors
    z = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
    dh = z(dh, hs)
    dhf, dcf, dnf, dmf = z(dhf, h0), z(dcf, c0), z(dnf, n0), z(dmf, m0)
    dgx, dR, dh0, dc0, dn0, dm0 = _slstm_bwd(
        gates, R, reset, h0, c0, n0, m0, hs, cs, ns, ms, dh, dhf, dcf, dnf, dmf, ctx.exp_f
    )
    return dgx.to(gates.dtype), dR.to(R.dtype), None, dh0, dc0, dn0, dm0, None


_slstm_fwd.register_autograd(_bwd, setup_context=_setup)


def slstm_sequence(
    gates: Tensor,
    R: Tensor,
    *,
    forget_gate: str = "sigmoid",
    initial_state=None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
):
    """Triton sLSTM over a sequence; same arguments and results as xlp.kernels.reference.slstm."""
    _check(gates, R, forget_gate, seq=True)
    check_device(gates, R)
    B, S, _, NH, DH = gates.shape
    kd = kernel_dtype(gates.dtype)
    sdt = torch.float64 if gates.dtype == torch.float64 else torch.float32
    g = gates.to(kd).contiguous()
    Rk = R.to(torch.float32).contiguous()
    if initial_state is None:
        zeros = gates.new_zeros(B, NH, DH, dtype=torch.float32)
        h0, c0, n0, m0 = zeros, zeros, zeros, torch.full_like(zeros, -math.inf)
    else:
        h0, c0, n0, m0 = (x.to(torch.float32).contiguous() for x in initial_state)
    reset = doc_starts_mask(doc_starts, B, S, gates.device)
    reset = reset.to(torch.int32).contiguous() if reset is not None else gates.new_empty(0, dtype=torch.int32)
    hout, hf, cf, nf, mf, *_ = _slstm_fwd(g, Rk, reset, h0, c0, n0, m0, forget_gate == "exp")
    hout = hout.to(gates.dtype)
    if return_final_state:
        return hout, tuple(x.to(sdt) for x in (hf, cf, nf, mf))
    return hout


def slstm_step(gates: Tensor, R: Tensor, state=None, *, forget_gate: str = "sigmoid"):
    """One sLSTM token through the sequence kernel (S = 1)."""
    h, st = slstm_sequence(gates[:, None], R, forget_gate=forget_gate, initial_state=state, return_final_state=True)
    return h[:, 0], st
