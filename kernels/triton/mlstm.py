"""Triton mLSTM: chunkwise forward/backward with document resets, and a fused one-token step.

Written from the xLSTM paper's equations (Beck et al., 2024) and the chunkwise / tiled-flash-linear-
attention idea (exact attention-like sum inside a chunk, a recurrent matrix state between chunks).
See kernels/triton/NOTES.md for the derivation of the backward pass and the tiling.

Notation (per batch-head, chunk of L tokens, t/s local positions):
    a_t = logsigmoid(f~_t)            g_t = sum_{j<=t in chunk} a_j        (chunk-local log decay)
    seg_t = number of document starts in the chunk up to and including t
    log D_ts = g_t - g_s + i~_s       (s <= t, seg_s == seg_t; else -inf)
    alive_t = seg_t == 0              (the carried state still reaches token t)
    m_t = max(alive_t ? g_t + m_c : -inf, max_s log D_ts)
    h_t = (P v + alpha_t q_t C~_c) / max(|P 1 + alpha_t q_t n~_c|, exp(-m_t)),
          P = (q k^T / sqrt(DQK)) * exp(log D - m_t),  alpha_t = exp(g_t + m_c - m_t)
The carried state (C~_c, n~_c, m_c) follows the reference's conventions (no state: m = -inf).
The stabilisers m are treated as constants in the backward (h does not depend on them); the only
true dependence on m is the returned final m, whose gradient is routed in PyTorch (float64 argmax).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from xlp.kernels.config import MLSTM_LAUNCH, mlstm_launch, set_mlstm_launch
from xlp.kernels.reference.common import doc_starts_mask
from xlp.kernels.triton._common import (
    TORCH_TO_TL,
    check_device,
    dot_precision,
    kernel_dtype,
    pow2_block,
    round_up,
)

NEG_INF = tl.constexpr(float("-inf"))  # constexpr: readable inside @triton.jit kernels


# --------------------------------------------------------------------------------------------
# Forward 1: recurrent pass over chunks, materialising the state at every chunk boundary.
# grid (B*NH, DQK / BK, DV / BV)
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_states_kernel(
    K, V, I, G, SEG, C0, N0, M0,  # inputs
    CST, NST, MST, CF, NF,  # outputs
    NH, S_P, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: states of long sequences exceed 2^31
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // NH
    offs_t = tl.arange(0, L)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    dt = K.dtype.element_ty

    C = tl.load(C0 + pid_bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :])
    n = tl.load(N0 + pid_bh * DQK + offs_k)
    m = tl.load(M0 + pid_bh)
    cst_base = CST + pid_bh * (NC + 1) * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
    nst_base = NST + pid_bh * (NC + 1) * DQK + offs_k
    for c in range(NC):
        tl.store(cst_base + c * DQK * DV, C.to(CST.dtype.element_ty))
        if pid_v == 0:
            tl.store(nst_base + c * DQK, n)
            if pid_k == 0:
                tl.store(MST + pid_bh * (NC + 1) + c, m)
        row = c * L + offs_t
        g = tl.load(G + pid_bh * S_P + row)
        ig = tl.load(I + pid_bh * S_P + row)
        seg = tl.load(SEG + b * S_P + row)
        g_end = tl.load(G + pid_bh * S_P + c * L + L - 1)
        seg_end = tl.load(SEG + b * S_P + c * L + L - 1)
        lw = tl.where(seg == seg_end, g_end - g + ig, NEG_INF)
        lw_state = tl.where(seg_end == 0, g_end + m, NEG_INF)
        m_new = tl.maximum(tl.max(lw, axis=0), lw_state)
        w = tl.exp(lw - m_new) * scale
        beta = tl.exp(lw_state - m_new)
        kb = tl.load(K + pid_bh * S_P * DQK + row[:, None] * DQK + offs_k[None, :])
        vb = tl.load(V + pid_bh * S_P * DV + row[:, None] * DV + offs_v[None, :])
        vw = (vb.to(tl.float32) * w[:, None]).to(dt)
        C = beta * C + tl.dot(tl.trans(kb), vw, input_precision=PREC)
        n = beta * n + tl.sum(kb.to(tl.float32) * w[:, None], axis=0)
        m = m_new
    tl.store(cst_base + NC * DQK * DV, C.to(CST.dtype.element_ty))
    tl.store(CF + pid_bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], C)
    if pid_v == 0:
        tl.store(nst_base + NC * DQK, n)
        tl.store(NF + pid_bh * DQK + offs_k, n)
        if pid_k == 0:
            tl.store(MST + pid_bh * (NC + 1) + NC, m)


# --------------------------------------------------------------------------------------------
# Forward 2: outputs of every chunk in parallel. grid (NC, DV / BV, B*NH)
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_out_kernel(
    Q, K, V, I, G, SEG, CST, NST, MST,
    H, MT, UT,
    NH, S_P, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // NH
    dt = Q.dtype.element_ty
    offs_t = tl.arange(0, L)
    offs_v = pid_v * BV + tl.arange(0, BV)
    row = c * L + offs_t

    S = tl.zeros([L, L], dtype=tl.float32)
    qC = tl.zeros([L, BV], dtype=tl.float32)
    qn = tl.zeros([L], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        qb = tl.load(Q + pid_bh * S_P * DQK + row[:, None] * DQK + offs_k[None, :])
        kb = tl.load(K + pid_bh * S_P * DQK + row[:, None] * DQK + offs_k[None, :])
        S += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        Cb = tl.load(CST + (pid_bh * (NC + 1) + c) * DQK * DV + offs_k[:, None] * DV + offs_v[None, :])
        qC += tl.dot(qb, Cb.to(dt), input_precision=PREC)
        nb = tl.load(NST + (pid_bh * (NC + 1) + c) * DQK + offs_k)
        qn += tl.sum(qb.to(tl.float32) * nb[None, :], axis=1)
    S = S * scale

    g = tl.load(G + pid_bh * S_P + row)
    ig = tl.load(I + pid_bh * S_P + row)
    seg = tl.load(SEG + b * S_P + row)
    m_c = tl.load(MST + pid_bh * (NC + 1) + c)
    mask = (offs_t[:, None] >= offs_t[None, :]) & (seg[:, None] == seg[None, :])
    logD = tl.where(mask, g[:, None] - g[None, :] + ig[None, :], NEG_INF)
    lw_state = tl.where(seg == 0, g + m_c, NEG_INF)
    m_t = tl.maximum(tl.max(logD, axis=1), lw_state)
    P = S * tl.exp(logD - m_t[:, None])
    alpha = tl.exp(lw_state - m_t)
    vb = tl.load(V + pid_bh * S_P * DV + row[:, None] * DV + offs_v[None, :])
    num = tl.dot(P.to(dt), vb, input_precision=PREC) + alpha[:, None] * qC
    u = tl.sum(P, axis=1) + alpha * qn
    den = tl.maximum(tl.abs(u), tl.exp(-m_t))
    h = num / den[:, None]
    tl.store(H + pid_bh * S_P * DV + row[:, None] * DV + offs_v[None, :], h.to(H.dtype.element_ty))
    if pid_v == 0:
        tl.store(MT + pid_bh * S_P + row, m_t)
        tl.store(UT + pid_bh * S_P + row, u)


# --------------------------------------------------------------------------------------------
# Backward 0: per-token scalars. R_t = dh.h + du*u (total log-weight gradient of query t) and
# du_t = d(loss)/d(u_t) through the normaliser. grid (S_P / BT, B*NH)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_prep_kernel(
    H, DH, MT, UT, DU, RT, S_P,
    DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    row = pid_t * BT + tl.arange(0, BT)
    rmask = row < S_P
    D = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        ptr = pid_bh * S_P * DV + row[:, None] * DV + offs_v[None, :]
        hb = tl.load(H + ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
        dhb = tl.load(DH + ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
        D += tl.sum(hb * dhb, axis=1)
    m_t = tl.load(MT + pid_bh * S_P + row, mask=rmask, other=0.0)
    u = tl.load(UT + pid_bh * S_P + row, mask=rmask, other=0.0)
    floor = tl.exp(-m_t)
    den = tl.maximum(tl.abs(u), floor)
    sgn = tl.where(u >= 0, 1.0, -1.0)
    du = tl.where(tl.abs(u) > floor, -D / den * sgn, 0.0)
    tl.store(DU + pid_bh * S_P + row, du, mask=rmask)
    tl.store(RT + pid_bh * S_P + row, D + du * u, mask=rmask)


# --------------------------------------------------------------------------------------------
# Backward 1: reverse recurrence of the state gradients dC~, dn~ over chunks.
# grid (B*NH, DQK / BK, DV / BV). DCST[c] = gradient of the state after chunk c.
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_states_kernel(
    Q, DH, G, SEG, MT, UT, DU, MST, DCF, DNF,
    DCST, DNST, DC0, DN0,
    NH, S_P, NC,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DCF: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: states of long sequences exceed 2^31
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // NH
    dt = Q.dtype.element_ty
    offs_t = tl.arange(0, L)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mat = offs_k[:, None] * DV + offs_v[None, :]
    if HAS_DCF:
        dC = tl.load(DCF + pid_bh * DQK * DV + mat)
        dn = tl.load(DNF + pid_bh * DQK + offs_k)
    else:  # no gradient reaches the final state: start from zero without reading a zero tensor
        dC = tl.zeros([BK, BV], dtype=tl.float32)
        dn = tl.zeros([BK], dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(DCST + (pid_bh * NC + c) * DQK * DV + mat, dC.to(DCST.dtype.element_ty))
        if pid_v == 0:
            tl.store(DNST + (pid_bh * NC + c) * DQK + offs_k, dn)
        row = c * L + offs_t
        g = tl.load(G + pid_bh * S_P + row)
        seg = tl.load(SEG + b * S_P + row)
        m_t = tl.load(MT + pid_bh * S_P + row)
        u = tl.load(UT + pid_bh * S_P + row)
        du = tl.load(DU + pid_bh * S_P + row)
        g_end = tl.load(G + pid_bh * S_P + c * L + L - 1)
        seg_end = tl.load(SEG + b * S_P + c * L + L - 1)
        m_c = tl.load(MST + pid_bh * (NC + 1) + c)
        m_next = tl.load(MST + pid_bh * (NC + 1) + c + 1)
        beta = tl.exp(tl.where(seg_end == 0, g_end + m_c, NEG_INF) - m_next)
        # d log(beta_c) = beta <dC~_{c+1}, C~_c> is summed in _bwd_chunk_kernel, which reads both
        # states anyway (this pass used to re-read every C~_c just for it: ~1 GB at the bench shape)
        floor = tl.exp(-m_t)
        den = tl.maximum(tl.abs(u), floor)
        alpha = tl.exp(tl.where(seg == 0, g + m_c, NEG_INF) - m_t)
        qb = tl.load(Q + pid_bh * S_P * DQK + row[:, None] * DQK + offs_k[None, :])
        dhb = tl.load(DH + pid_bh * S_P * DV + row[:, None] * DV + offs_v[None, :]).to(tl.float32)
        dnum = (dhb * (alpha / den)[:, None]).to(dt)
        dC = beta * dC + tl.dot(tl.trans(qb), dnum, input_precision=PREC)
        dn = beta * dn + tl.sum(qb.to(tl.float32) * (alpha * du)[:, None], axis=0)
    tl.store(DC0 + pid_bh * DQK * DV + mat, dC)
    if pid_v == 0:
        tl.store(DN0 + pid_bh * DQK + offs_k, dn)


# --------------------------------------------------------------------------------------------
# Backward 2: gradients of q, k, v and the gates, every chunk in parallel. grid (NC, B*NH)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_chunk_kernel(
    Q, K, V, I, G, SEG, DH, MT, UT, DU, RT, CST, NST, MST, DCST, DNST,
    DQ, DK, DV_, DG, DI, DALPHA, DLBETA,
    NH, S_P, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // NH
    dt = Q.dtype.element_ty
    offs_t = tl.arange(0, L)
    row = c * L + offs_t
    qk_base = pid_bh * S_P * DQK + row[:, None] * DQK
    v_base = pid_bh * S_P * DV + row[:, None] * DV
    cst = CST + (pid_bh * (NC + 1) + c) * DQK * DV
    nst = NST + (pid_bh * (NC + 1) + c) * DQK
    dcst = DCST + (pid_bh * NC + c) * DQK * DV
    dnst = DNST + (pid_bh * NC + c) * DQK

    g = tl.load(G + pid_bh * S_P + row)
    ig = tl.load(I + pid_bh * S_P + row)
    seg = tl.load(SEG + b * S_P + row)
    m_t = tl.load(MT + pid_bh * S_P + row)
    u = tl.load(UT + pid_bh * S_P + row)
    du = tl.load(DU + pid_bh * S_P + row)
    g_end = tl.load(G + pid_bh * S_P + c * L + L - 1)
    seg_end = tl.load(SEG + b * S_P + c * L + L - 1)
    m_c = tl.load(MST + pid_bh * (NC + 1) + c)
    m_next = tl.load(MST + pid_bh * (NC + 1) + c + 1)
    den = tl.maximum(tl.abs(u), tl.exp(-m_t))
    inv_den = 1.0 / den
    alpha = tl.exp(tl.where(seg == 0, g + m_c, NEG_INF) - m_t)
    # gamma_s: weight of token s in the state leaving the chunk (k scale folded in)
    gamma = tl.exp(tl.where(seg == seg_end, g_end - g + ig, NEG_INF) - m_next) * scale

    S = tl.zeros([L, L], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        qb = tl.load(Q + qk_base + offs_k[None, :])
        kb = tl.load(K + qk_base + offs_k[None, :])
        S += tl.dot(qb, tl.trans(kb), input_precision=PREC)
    S = S * scale
    mask = (offs_t[:, None] >= offs_t[None, :]) & (seg[:, None] == seg[None, :])
    logD = tl.where(mask, g[:, None] - g[None, :] + ig[None, :], NEG_INF)
    E = tl.exp(logD - m_t[:, None])
    P = S * E

    dPv = tl.zeros([L, L], dtype=tl.float32)
    dlg = tl.zeros([L], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        dnum = (tl.load(DH + v_base + offs_v[None, :]).to(tl.float32) * inv_den[:, None]).to(dt)
        vb = tl.load(V + v_base + offs_v[None, :])
        dPv += tl.dot(dnum, tl.trans(vb), input_precision=PREC)
        dvb = tl.dot(tl.trans(P.to(dt)), dnum, input_precision=PREC)
        kdC = tl.zeros([L, BV], dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            offs_k = k0 + tl.arange(0, BK)
            kb = tl.load(K + qk_base + offs_k[None, :])
            dCb = tl.load(dcst + offs_k[:, None] * DV + offs_v[None, :])
            kdC += tl.dot(kb, dCb.to(dt), input_precision=PREC)
        dvb += gamma[:, None] * kdC
        dlg += tl.sum(kdC * vb.to(tl.float32), axis=1)
        tl.store(DV_ + v_base + offs_v[None, :], dvb.to(DV_.dtype.element_ty))

    dP = dPv + du[:, None]
    dS = (dP * E).to(dt)
    dlogD = P * dP
    dlb = tl.zeros([BK], dtype=tl.float32)  # <dC~_{c+1}, C~_c> + <dn~_{c+1}, n~_c>, row partials
    ra = tl.zeros([L], dtype=tl.float32)  # q_t.(C~_c dnum_t + n~_c du_t): d log(alpha_t) / alpha_t
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        qb = tl.load(Q + qk_base + offs_k[None, :])
        kb = tl.load(K + qk_base + offs_k[None, :])
        dqb = tl.dot(dS, kb, input_precision=PREC) * scale
        dkb = tl.dot(tl.trans(dS), qb, input_precision=PREC) * scale
        qCd = tl.zeros([L, BK], dtype=tl.float32)
        vdC = tl.zeros([L, BK], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            dnum = (tl.load(DH + v_base + offs_v[None, :]).to(tl.float32) * inv_den[:, None]).to(dt)
            vb = tl.load(V + v_base + offs_v[None, :])
            Cb = tl.load(cst + offs_k[:, None] * DV + offs_v[None, :])
            dCb = tl.load(dcst + offs_k[:, None] * DV + offs_v[None, :])
            dlb += tl.sum(Cb.to(tl.float32) * dCb.to(tl.float32), axis=1)
            qCd += tl.dot(dnum, tl.trans(Cb.to(dt)), input_precision=PREC)
            vdC += tl.dot(vb, tl.trans(dCb.to(dt)), input_precision=PREC)
        nb = tl.load(nst + offs_k)
        dnb = tl.load(dnst + offs_k)
        dlb += nb * dnb
        qCdn = qCd + du[:, None] * nb[None, :]
        ra += tl.sum(qb.to(tl.float32) * qCdn, axis=1)
        dqb += alpha[:, None] * qCdn
        dkb += gamma[:, None] * (vdC + dnb[None, :])
        dlg += tl.sum(kb.to(tl.float32) * dnb[None, :], axis=1)
        tl.store(DQ + qk_base + offs_k[None, :], dqb.to(DQ.dtype.element_ty))
        tl.store(DK + qk_base + offs_k[None, :], dkb.to(DK.dtype.element_ty))

    dlog_gamma = gamma * dlg
    colsum = tl.sum(dlogD, axis=0)
    rowsum = tl.sum(dlogD, axis=1)
    beta = tl.exp(tl.where(seg_end == 0, g_end + m_c, NEG_INF) - m_next)
    dlogbeta = beta * tl.sum(dlb, axis=0)
    tl.store(DLBETA + pid_bh * NC + c, dlogbeta)
    # query-side total of token t's log-weights, summed from the same fp32 terms as colsum (not
    # dh.h with the stored bf16 h, which left di/df ~2x worse than necessary in bf16)
    dlog_alpha = tl.where(seg == 0, alpha * ra, 0.0)
    R = rowsum + dlog_alpha
    dg = R - colsum - dlog_gamma + tl.where(offs_t == L - 1, tl.sum(dlog_gamma, axis=0) + dlogbeta, 0.0)
    tl.store(DG + pid_bh * S_P + row, dg)
    tl.store(DI + pid_bh * S_P + row, colsum + dlog_gamma)
    tl.store(DALPHA + pid_bh * S_P + row, dlog_alpha)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
# Launch configuration of the four chunkwise kernels: the table and its meaning are in
# kernels/config.py (MLSTM_LAUNCH, the built-in one; `kernels.mlstm` config key changes it). _CFG is
# the process's table (xlp.kernels.config.mlstm_launch, replaced in place by KernelsConfig.apply or
# set_mlstm_config). `python benchmarks/bench_kernels.py --sweep` times variants on a GPU and prints the best
# as `kernels.mlstm.KEY=N` config overrides.
DEFAULT_CFG = MLSTM_LAUNCH
_CFG = mlstm_launch


def format_cfg(cfg: dict) -> str:
    """The entries of `cfg` that differ from DEFAULT_CFG, as 'bc_w=4,bc_s=2' ('default': none)."""
    return ",".join(f"{k}={v}" for k, v in cfg.items() if DEFAULT_CFG.get(k) != v) or "default"


def mlstm_config() -> dict:
    return dict(_CFG)


def set_mlstm_config(cfg: Optional[dict] = None, **kw) -> dict:
    """Replace the launch configuration (missing keys take DEFAULT_CFG); returns the previous one."""
    return set_mlstm_launch(cfg, **kw)


def _kcfg(name: str, DQK: int, DV: int, L: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BK, BV, launch kwargs) of one kernel under the current configuration."""
    c = _CFG
    bk, bv, w, st = c[name + "_bk"], c[name + "_bv"], c[name + "_w"], c[name + "_s"]
    if L > 64:  # L x L tiles take the registers: smaller state tiles
        bk, bv = min(bk, 32), min(bv, 64 if name == "fo" else 32)
    if dtype == torch.float32 and name in ("fs", "bs"):
        st = 1  # fp32 tiles are twice the shared memory per stage
    return pow2_block(DQK, bk), pow2_block(DV, bv), {"num_warps": w, "num_stages": st}


def pick_chunk_size(S: int, DQK: int, DV: int, requested: Optional[int] = None) -> int:
    """Chunk size table: a power of two >= 16. The L x L tiles of the backward live in registers,
    which caps L at 64 for head dims >= 256 on current GPUs (so chunk_size=128 runs as 64 there);
    short sequences use shorter chunks. The `chunk` config key (tuning) overrides the table."""
    if _CFG.get("chunk"):
        L = 1 << max(4, (int(_CFG["chunk"]) - 1).bit_length())
    else:
        L = requested if requested else 64
        L = 1 << max(4, (int(L) - 1).bit_length())  # round up to a power of two, at least 16
        L = min(L, 128)
        if max(DQK, DV) >= 256:
            L = min(L, 64)
    while L > 16 and L >= 2 * S:
        L //= 2
    return L


def _seg_chunk(doc_starts: Optional[Tensor], B: int, S: int, S_P: int, L: int, device) -> Tensor:
    """Chunk-local document counter (B, S_P) int32: resets seen in the chunk up to and including t."""
    if doc_starts is None:
        return torch.zeros(B, S_P, dtype=torch.int32, device=device)

    reset = doc_starts_mask(doc_starts, B, S, device)
    reset = F.pad(reset.to(torch.int32), (0, S_P - S))
    return torch.cumsum(reset.view(B, S_P // L, L), dim=-1).view(B, S_P).to(torch.int32).contiguous()


def _fwd_impl(q, k, v, i, f, C0, n0, m0, seg, L):
    """q,k,v padded (BH, S_P, D); i, f (BH, S_P) fp32 padded; seg (B, S_P). Returns everything."""
    BH, S_P, DQK = q.shape
    DV = v.shape[-1]
    NH = BH // seg.shape[0]
    NC = S_P // L
    scale = DQK**-0.5
    dev = q.device
    a = F.logsigmoid(f)
    g = torch.cumsum(a.view(BH, NC, L), dim=-1).view(BH, S_P)
    cst = torch.empty(BH, NC + 1, DQK, DV, dtype=q.dtype, device=dev)
    nst = torch.empty(BH, NC + 1, DQK, dtype=torch.float32, device=dev)
    mst = torch.empty(BH, NC + 1, dtype=torch.float32, device=dev)
    Cf = torch.empty(BH, DQK, DV, dtype=torch.float32, device=dev)
    nf = torch.empty(BH, DQK, dtype=torch.float32, device=dev)
    prec = dot_precision(q.dtype)
    BK, BV, kw = _kcfg("fs", DQK, DV, L, q.dtype)
    _fwd_states_kernel[(BH, DQK // BK, DV // BV)](
        k, v, i, g, seg, C0, n0, m0, cst, nst, mst, Cf, nf, NH, S_P, NC, scale,
        DQK=DQK, DV=DV, L=L, BK=BK, BV=BV, PREC=prec, **kw,
    )
    h = torch.empty_like(v)
    mt = torch.empty(BH, S_P, dtype=torch.float32, device=dev)
    ut = torch.empty(BH, S_P, dtype=torch.float32, device=dev)
    BKo, BVo, kw = _kcfg("fo", DQK, DV, L, q.dtype)
    _fwd_out_kernel[(NC, DV // BVo, BH)](
        q, k, v, i, g, seg, cst, nst, mst, h, mt, ut, NH, S_P, NC, scale,
        DQK=DQK, DV=DV, L=L, BK=BKo, BV=BVo, PREC=prec, **kw,
    )
    return h, Cf, nf, mst[:, NC].clone(), cst, nst, mst, mt, ut, g


def _bwd_impl(q, k, v, i, f, g, seg, h, dh, cst, nst, mst, mt, ut, dCf, dnf, L):
    """dCf/dnf None: no gradient reaches the final state (no zero tensors are made or read)."""
    BH, S_P, DQK = q.shape
    DV = v.shape[-1]
    NH = BH // seg.shape[0]
    NC = S_P // L
    scale = DQK**-0.5
    dev = q.device
    prec = dot_precision(q.dtype)
    du = torch.empty(BH, S_P, dtype=torch.float32, device=dev)
    rt = torch.empty_like(du)
    BT = 64
    _bwd_prep_kernel[(triton.cdiv(S_P, BT), BH)](
        h, dh, mt, ut, du, rt, S_P, DV=DV, BT=BT, BV=pow2_block(DV, 64), num_warps=4,
    )
    dcst = torch.empty(BH, NC, DQK, DV, dtype=q.dtype, device=dev)
    dnst = torch.empty(BH, NC, DQK, dtype=torch.float32, device=dev)
    dC0 = torch.empty(BH, DQK, DV, dtype=torch.float32, device=dev)
    dn0 = torch.empty(BH, DQK, dtype=torch.float32, device=dev)
    has_dcf = dCf is not None
    BK, BV, kw = _kcfg("bs", DQK, DV, L, q.dtype)
    _bwd_states_kernel[(BH, DQK // BK, DV // BV)](
        q, dh, g, seg, mt, ut, du, mst, dCf if has_dcf else dC0, dnf if has_dcf else dn0,
        dcst, dnst, dC0, dn0, NH, S_P, NC,
        DQK=DQK, DV=DV, L=L, BK=BK, BV=BV, HAS_DCF=has_dcf, PREC=prec, **kw,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dg = torch.empty(BH, S_P, dtype=torch.float32, device=dev)
    di = torch.empty_like(dg)
    dalpha = torch.empty_like(dg)
    dlogbeta = torch.empty(BH, NC, dtype=torch.float32, device=dev)
    BK, BV, kw = _kcfg("bc", DQK, DV, L, q.dtype)
    _bwd_chunk_kernel[(NC, BH)](
        q, k, v, i, g, seg, dh, mt, ut, du, rt, cst, nst, mst, dcst, dnst,
        dq, dk, dv, dg, di, dalpha, dlogbeta, NH, S_P, NC, scale,
        DQK=DQK, DV=DV, L=L, BK=BK, BV=BV, PREC=prec, **kw,
    )
    # g = chunk-local cumsum of a  ->  da_r = sum_{t >= r in the chunk} dg_t
    da = torch.flip(torch.cumsum(torch.flip(dg.view(BH, NC, L), [-1]), -1), [-1]).reshape(BH, S_P)
    dm0 = dlogbeta[:, 0] + dalpha[:, :L].sum(-1)
    return dq, dk, dv, da, di, dC0, dn0, dm0


def _final_m_grad(a, i, seg_global, m0, dm_eff):
    """Gradient of the returned final stabiliser m_S = max(m0 + sum a, max_s i_s + sum_{r>s} a_r)
    (over the last document) through its argmax, in float64. a, i: (BH, S_P); seg_global (BH, S_P)."""
    a64 = a.double()
    A = torch.cumsum(a64, -1)
    total = A[:, -1:]
    last = seg_global[:, -1:]
    cand = torch.where(seg_global == last, i.double() + total - A, torch.full_like(A, -math.inf))
    cand_init = torch.where(last[:, 0] == 0, m0.double() + total[:, 0], torch.full_like(total[:, 0], -math.inf))
    best_tok, s_star = cand.max(-1)
    use_init = cand_init >= best_tok
    dm = dm_eff.double()
    pos = torch.arange(a.shape[-1], device=a.device)
    # token s*: d i_{s*} = dm; d a_r = dm for r > s*.  init: d m0 = dm; d a_r = dm for every r.
    di = torch.zeros_like(a64)
    di.scatter_(1, s_star[:, None], torch.where(use_init, 0.0, dm)[:, None])
    da = torch.where(use_init[:, None] | (pos[None, :] > s_star[:, None]), dm[:, None], 0.0)
    dm0 = torch.where(use_init, dm, 0.0)
    return da.float(), di.float(), dm0.float()


# --------------------------------------------------------------------------------------------
# torch custom ops (traceable by torch.compile) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("xlp_triton::mlstm_chunkwise_fwd", mutates_args=())
def _mlstm_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,
    C0: Tensor, n0: Tensor, m0: Tensor, seg: Tensor, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Padded, flattened inputs (BH, S_P, D). Returns h, C, n, m and the saved tensors
    (chunk states C~, n~, m, per-token m_t and u_t)."""
    h, Cf, nf, mf, cst, nst, mst, mt, ut, _ = _fwd_impl(q, k, v, i, f, C0, n0, m0, seg, chunk_size)
    return h, Cf, nf, mf, cst, nst, mst, mt, ut


@_mlstm_fwd_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, seg, chunk_size):
    BH, S_P, DQK = q.shape
    DV = v.shape[-1]
    NC = S_P // chunk_size
    f32 = dict(dtype=torch.float32, device=q.device)
    return (
        v.new_empty(v.shape), q.new_empty(BH, DQK, DV, dtype=torch.float32), q.new_empty(BH, DQK, **f32),
        q.new_empty(BH, **f32), q.new_empty(BH, NC + 1, DQK, DV), q.new_empty(BH, NC + 1, DQK, **f32),
        q.new_empty(BH, NC + 1, **f32), q.new_empty(BH, S_P, **f32), q.new_empty(BH, S_P, **f32),
    )


@torch.library.custom_op("xlp_triton::mlstm_chunkwise_bwd", mutates_args=())
def _mlstm_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, m0: Tensor, seg: Tensor,
    h: Tensor, dh: Tensor, cst: Tensor, nst: Tensor, mst: Tensor, mt: Tensor, ut: Tensor,
    Cf: Tensor, nf: Tensor, dCf: Optional[Tensor], dnf: Optional[Tensor], dmf: Optional[Tensor],
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dCf, dnf, dmf: gradients of the returned final state, or all None when none reaches it
    (the training case: then no zero tensors, no dm_eff reduction and no host sync)."""
    L = chunk_size
    BH, S_P, _ = q.shape
    NC = S_P // L
    a = F.logsigmoid(f)
    g = torch.cumsum(a.view(BH, NC, L), dim=-1).view(BH, S_P)
    has_state_grad = dCf is not None or dnf is not None or dmf is not None
    if has_state_grad:
        dCf = torch.zeros_like(Cf) if dCf is None else dCf.contiguous()
        dnf = torch.zeros_like(nf) if dnf is None else dnf.contiguous()
        dmf = torch.zeros_like(m0) if dmf is None else dmf
    dq, dk, dv, da, di, dC0, dn0, dm0 = _bwd_impl(
        q, k, v, i, f, g, seg, h, dh.contiguous(), cst, nst, mst, mt, ut, dCf, dnf, L
    )
    if not has_state_grad:
        return dq, dk, dv, di, da * torch.sigmoid(-f), dC0, dn0, dm0
    # the returned C~ = C exp(-m), n~ likewise: their gradients also reach m; route it to the argmax
    dm_eff = dmf - (dCf * Cf).sum((-1, -2)) - (dnf * nf).sum(-1)
    if bool((dm_eff != 0).any()):
        B = seg.shape[0]
        NH = BH // B
        seg_g = seg.view(B, NC, L).clone()
        seg_g += torch.cumsum(F.pad(seg_g[:, :-1, -1], (1, 0)), dim=1)[:, :, None]  # global doc ids
        seg_g = seg_g.view(B, 1, S_P).expand(B, NH, S_P).reshape(BH, S_P)
        da2, di2, dm02 = _final_m_grad(a, i, seg_g, m0, dm_eff)
        da = da + da2
        di = di + di2
        dm0 = dm0 + dm02
    df = da * torch.sigmoid(-f)
    return dq, dk, dv, di, df, dC0, dn0, dm0


@_mlstm_bwd_op.register_fake
def _(q, k, v, i, f, m0, seg, h, dh, cst, nst, mst, mt, ut, Cf, nf, dCf, dnf, dmf, chunk_size):
    return (
        q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), i.new_empty(i.shape),
        f.new_empty(f.shape), torch.empty_like(Cf), torch.empty_like(nf), torch.empty_like(m0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, seg, chunk_size = inputs
    h, Cf, nf, mf, cst, nst, mst, mt, ut = output
    ctx.save_for_backward(q, k, v, i, f, m0, seg, h, cst, nst, mst, mt, ut, Cf, nf)
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(cst, nst, mst, mt, ut)
    # unused outputs (the final state in training) get None, not zero tensors: see _mlstm_bwd_op
    ctx.set_materialize_grads(False)


def _backward(ctx, dh, dCf, dnf, dmf, *_):
    q, k, v, i, f, m0, seg, h, cst, nst, mst, mt, ut, Cf, nf = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh
    dq, dk, dv, di, df, dC0, dn0, dm0 = _mlstm_bwd_op(
        q, k, v, i, f, m0, seg, h, dh, cst, nst, mst, mt, ut, Cf, nf, dCf, dnf, dmf, ctx.chunk_size
    )
    return dq, dk, dv, di, df, dC0, dn0, dm0, None, None


_mlstm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    chunk_size: int = 64,
    initial_state=None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
):
    """Triton chunkwise mLSTM; same arguments and results as xlp.kernels.reference.mlstm.mlstm_chunkwise.

    chunk_size is a request: it is rounded to a power of two in [16, 128] by `pick_chunk_size`.
    """
    check_device(q, k, v)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    out_dtype = v.dtype
    kd = kernel_dtype(q.dtype)
    L = pick_chunk_size(S, DQK, DV, chunk_size)
    S_P = round_up(S, L)
    DQK_P, DV_P = round_up(DQK, 16), round_up(DV, 16)
    pad_s = S_P - S
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def prep(x, D_P):  # (B, NH, S, D) -> (BH, S_P, D_P), kernel dtype, zero padded
        x = x.to(kd)
        if pad_s or D_P != x.shape[-1]:
            x = F.pad(x, (0, D_P - x.shape[-1], 0, pad_s))
        return x.reshape(B * NH, S_P, D_P).contiguous()

    qp = prep(q, DQK_P)
    # the kernels fold 1/sqrt(DQK_P) in; pre-scale k so the true 1/sqrt(DQK) results
    kp = prep(k * (DQK_P / DQK) ** 0.5 if DQK_P != DQK else k, DQK_P)
    vp = prep(v, DV_P)
    # padded tokens: no input (i = -inf), no decay (f = +inf -> logsigmoid 0)
    ip, fp = i.float(), f.float()
    if pad_s:
        ip = F.pad(ip, (0, pad_s), value=-math.inf)
        fp = F.pad(fp, (0, pad_s), value=math.inf)
    ip = ip.reshape(B * NH, S_P).contiguous()
    fp = fp.reshape(B * NH, S_P).contiguous()
    if initial_state is None:
        C0 = q.new_zeros(B * NH, DQK_P, DV_P, dtype=torch.float32)
        n0 = q.new_zeros(B * NH, DQK_P, dtype=torch.float32)
        m0 = q.new_full((B * NH,), -math.inf, dtype=torch.float32)
    else:
        C0, n0, m0 = initial_state
        C0 = F.pad(C0.float(), (0, DV_P - DV, 0, DQK_P - DQK)).reshape(B * NH, DQK_P, DV_P)
        n0 = F.pad(n0.float(), (0, DQK_P - DQK)).reshape(B * NH, DQK_P)
        m0 = m0.float().reshape(B * NH)
    seg = _seg_chunk(doc_starts, B, S, S_P, L, q.device)
    h, Cf, nf, mf, *_ = _mlstm_fwd_op(qp, kp, vp, ip, fp, C0.contiguous(), n0.contiguous(), m0.contiguous(), seg, L)
    h = h.view(B, NH, S_P, DV_P)[:, :, :S, :DV].to(out_dtype)
    if not return_final_state:
        return h
    Cf = Cf.view(B, NH, DQK_P, DV_P)[:, :, :DQK, :DV].to(sdt)
    nf = nf.view(B, NH, DQK_P)[:, :, :DQK].to(sdt)
    mf = mf.view(B, NH).to(sdt)
    return h, (Cf, nf, mf)


def mlstm_parallel(q, k, v, i, f, *, initial_state=None, return_final_state=False, doc_starts=None):
    """The parallel form has the same results as the chunkwise one; on GPU the chunkwise kernel is
    the fast way to compute them, so the Triton backend serves both names with it."""
    return mlstm_chunkwise(
        q, k, v, i, f, chunk_size=64, initial_state=initial_state,
        return_final_state=return_final_state, doc_starts=doc_starts,
    )


# --------------------------------------------------------------------------------------------
# One-token step (generation): C' = f' C + i' k v^T, n' = f' n + i' k, h = C'^T q / max(|n'.q|, e^-m')
# grid (B*NH, DV / BV); every program also updates n (only program 0 stores it).
# --------------------------------------------------------------------------------------------
@triton.jit
def _step_kernel(
    Q, K, V, I, F_, C, N, M, H, CO, NO, MO, scale,
    DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: states of long sequences exceed 2^31
    pid_v = tl.program_id(1)
    offs_v = pid_v * BV + tl.arange(0, BV)
    fr = tl.load(F_ + pid_bh).to(tl.float32)
    ir = tl.load(I + pid_bh).to(tl.float32)
    m = tl.load(M + pid_bh)
    log_f = tl.minimum(fr, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fr)))  # logsigmoid, stable
    m_new = tl.maximum(log_f + m, ir)
    fs = tl.exp(log_f + m - m_new)
    is_ = tl.exp(ir - m_new)
    vb = tl.load(V + pid_bh * DV + offs_v).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    qn = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        qb = tl.load(Q + pid_bh * DQK + offs_k).to(tl.float32)
        kb = tl.load(K + pid_bh * DQK + offs_k).to(tl.float32) * scale
        ptr = pid_bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
        Cb = fs * tl.load(C + ptr) + is_ * kb[:, None] * vb[None, :]
        tl.store(CO + ptr, Cb)
        num += tl.sum(qb[:, None] * Cb, axis=0)
        nb = fs * tl.load(N + pid_bh * DQK + offs_k) + is_ * kb
        qn += qb * nb
        if pid_v == 0:
            tl.store(NO + pid_bh * DQK + offs_k, nb)
    den = tl.maximum(tl.abs(tl.sum(qn, axis=0)), tl.exp(-m_new))
    tl.store(H + pid_bh * DV + offs_v, (num / den).to(H.dtype.element_ty))
    if pid_v == 0:
        tl.store(MO + pid_bh, m_new)


def mlstm_step(q, k, v, i, f, state=None):
    """Fused one-token mLSTM (no autograd: generation). Same arguments/results as the reference."""
    check_device(q, k, v)
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    DQK_P, DV_P = round_up(DQK, 16), round_up(DV, 16)
    if state is None:
        C = q.new_zeros(B * NH, DQK_P, DV_P, dtype=torch.float32)
        n = q.new_zeros(B * NH, DQK_P, dtype=torch.float32)
        m = q.new_full((B * NH,), -math.inf, dtype=torch.float32)
    else:
        C, n, m = state
        C = F.pad(C.float(), (0, DV_P - DV, 0, DQK_P - DQK)).reshape(B * NH, DQK_P, DV_P).contiguous()
        n = F.pad(n.float(), (0, DQK_P - DQK)).reshape(B * NH, DQK_P).contiguous()
        m = m.float().reshape(B * NH).contiguous()
    kd = kernel_dtype(q.dtype)
    qp = F.pad(q.to(kd), (0, DQK_P - DQK)).reshape(B * NH, DQK_P).contiguous()
    kp = F.pad(k.to(kd), (0, DQK_P - DQK)).reshape(B * NH, DQK_P).contiguous()
    vp = F.pad(v.to(kd), (0, DV_P - DV)).reshape(B * NH, DV_P).contiguous()
    ip = i.float().reshape(B * NH).contiguous()
    fp = f.float().reshape(B * NH).contiguous()
    h = torch.empty(B * NH, DV_P, dtype=kd, device=q.device)
    Co, no, mo = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    BV = pow2_block(DV_P, 64)
    _step_kernel[(B * NH, DV_P // BV)](
        qp, kp, vp, ip, fp, C, n, m, h, Co, no, mo, DQK**-0.5,
        DQK=DQK_P, DV=DV_P, BK=pow2_block(DQK_P, 64), BV=BV, num_warps=4,
    )
    h = h.view(B, NH, DV_P)[..., :DV].to(v.dtype)
    Co = Co.view(B, NH, DQK_P, DV_P)[..., :DQK, :DV].to(sdt)
    no = no.view(B, NH, DQK_P)[..., :DQK].to(sdt)
    return h, (Co, no, mo.view(B, NH).to(sdt))
