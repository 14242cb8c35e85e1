"""Reference mLSTM: the stabilised matrix-memory cell of xLSTM (Beck et al., 2024), three ways.

Pure PyTorch, written for reading; this is the oracle the Triton kernels are tested against.

The cell (xLSTM eqs. (19)-(27), gates given as pre-activations i~, f~):

    f_t = sigmoid(f~_t)          i_t = exp(i~_t)           (exponential input gate)
    C_t = f_t C_{t-1} + i_t k_t v_t^T                       (matrix memory, DQK x DV)
    n_t = f_t n_{t-1} + i_t k_t                              (normaliser state)
    h_t = C_t^T q_t / max(|n_t . q_t|, 1)

with k_t already scaled by DQK^-1/2. Stabilised (eqs. (15)-(17)): a max-state m_t keeps exp() finite,

    m_t = max(log f_t + m_{t-1}, i~_t)
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i~_t - m_t) k_t v_t^T       (same for n_t)
    h_t = C_t^T q_t / max(|n_t . q_t|, exp(-m_t))

The stored (C, n) are the true ones times exp(-m), so h_t does not depend on how m is chosen.
Unrolled, the weight of token s in the memory at time t is  log D_ts = F_t - F_s + i~_s  with
F_t = sum_{j<=t} log f_j, which gives the parallel (attention-like) form, and splitting the
sequence into chunks gives the chunkwise form: exact attention inside a chunk, the recurrent state
between chunks.

State conventions (shared by every backend):
- state = (C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH)), float32 (float64 for float64 inputs);
  C and n accumulate the *scaled* keys k / sqrt(DQK).
- `initial_state=None` means no memory: C = 0, n = 0, m = -inf (the state's term is dropped), so the
  returned m is exactly max over the tokens' log-weights.
- doc_starts[b, t] True: token t begins a new document; everything before it (initial state
  included) is forgotten, as if f_t = 0.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from xlp.kernels.reference.common import compute_dtype, doc_starts_mask, segment_ids

MLSTMState = tuple[Tensor, Tensor, Tensor]  # (C, n, m)


def _empty_state(batch: int, heads: int, dqk: int, dv: int, dtype: torch.dtype, device) -> MLSTMState:
    C = torch.zeros(batch, heads, dqk, dv, dtype=dtype, device=device)
    n = torch.zeros(batch, heads, dqk, dtype=dtype, device=device)
    m = torch.full((batch, heads), -math.inf, dtype=dtype, device=device)
    return C, n, m


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, NH, S, DQK) and v (B, NH, S, DV), got {q.shape}, {k.shape}, {v.shape}")
    if i.shape != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError(f"expected gates i, f of shape (B, NH, S) = {tuple(q.shape[:3])}, got {i.shape}, {f.shape}")


def mlstm_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    initial_state: Optional[MLSTMState] = None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, MLSTMState]]:
    """Stabilised parallel mLSTM, O(S^2) memory: the ground truth the other forms are checked against.

    q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S) gate pre-activations.
    initial_state: (C, n, m) or None; doc_starts: bool (B, S) or cu_seqlens (N+1,) for B = 1.
    Returns h (B, NH, S, DV) in v's dtype, and the final state if asked.
    """
    _check_shapes(q, k, v, i, f)
    B, NH, S, DQK = q.shape
    dtype = compute_dtype(q, k, v, i, f)
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):  # gates and states stay in full precision
        q, k, v, i, f = (x.to(dtype) for x in (q, k, v, i, f))
        k = k * DQK**-0.5
        if initial_state is None:
            C0, n0, m0 = _empty_state(B, NH, DQK, v.shape[-1], dtype, q.device)
        else:
            C0, n0, m0 = (x.to(dtype) for x in initial_state)
        reset = doc_starts_mask(doc_starts, B, S, q.device)
        seg = segment_ids(reset)[:, None, :] if reset is not None else torch.zeros(1, 1, S, dtype=torch.long, device=q.device)

        log_f = F.logsigmoid(f)
        F_cum = torch.cumsum(log_f, dim=-1)  # F_t = sum_{j<=t} log f_j
        # log D_ts = F_t - F_s + i~_s: log-weight of token s in the memory read at t (s <= t, same document)
        log_d = F_cum[..., :, None] - F_cum[..., None, :] + i[..., None, :]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        same_doc = seg[..., :, None] == seg[..., None, :]
        log_d = log_d.masked_fill(~(causal & same_doc), -math.inf)
        # The initial state decays by every forget gate up to t; it only reaches tokens of segment 0.
        log_w0 = (F_cum + m0[..., None]).masked_fill(seg != 0, -math.inf)

        m = torch.maximum(log_d.amax(dim=-1), log_w0)  # stabiliser: the largest log-weight per query
        scores = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m[..., None])
        w0 = torch.exp(log_w0 - m)
        num = scores @ v + w0[..., None] * (q @ C0)
        den = scores.sum(dim=-1) + w0 * (q @ n0[..., None]).squeeze(-1)
        h = num / torch.maximum(den.abs(), torch.exp(-m))[..., None]  # xLSTM eq. (21) normaliser

        if not return_final_state:
            return h.to(out_dtype)
        # The state after the last token: the same weights, read at t = S-1 with the last token's segment.
        last_seg = seg[..., -1:]
        log_w_end = (F_cum[..., -1:] - F_cum + i).masked_fill(seg != last_seg, -math.inf)
        log_w0_end = (F_cum[..., -1] + m0).masked_fill(last_seg[..., 0] != 0, -math.inf)
        m_end = torch.maximum(log_w_end.amax(dim=-1), log_w0_end)
        w_end = torch.exp(log_w_end - m_end[..., None])
        w0_end = torch.exp(log_w0_end - m_end)
        C_end = w0_end[..., None, None] * C0 + (k * w_end[..., None]).transpose(-1, -2) @ v
        n_end = w0_end[..., None] * n0 + (k * w_end[..., None]).sum(dim=-2)
    return h.to(out_dtype), (C_end, n_end, m_end)


def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Optional[MLSTMState] = None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, MLSTMState]]:
    """Stabilised chunkwise mLSTM: O(S * chunk_size) memory, any S (padded internally), any chunk size.

    Inside a chunk of L tokens the parallel form (L x L); between chunks the recurrent state
    (C, n, m), carried chunk to chunk. Same arguments and results as `mlstm_parallel`.
    """
    _check_shapes(q, k, v, i, f)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    dtype = compute_dtype(q, k, v, i, f)
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, i, f = (x.to(dtype) for x in (q, k, v, i, f))
        k = k * DQK**-0.5
        if initial_state is None:
            C, n, m = _empty_state(B, NH, DQK, DV, dtype, q.device)
        else:
            C, n, m = (x.to(dtype) for x in initial_state)
        reset = doc_starts_mask(doc_starts, B, S, q.device)
        if reset is None:
            reset = torch.zeros(B, S, dtype=torch.bool, device=q.device)
        log_f = F.logsigmoid(f)

        # Pad S up to a multiple of L. Padded tokens come after every real one, so they cannot touch
        # real outputs (causality); they are kept out of the carried state by `valid` below.
        L = chunk_size
        NC = -(-S // L)
        pad = NC * L - S
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            i, log_f = (F.pad(x, (0, pad)) for x in (i, log_f))
            reset = F.pad(reset, (0, pad), value=False)
        valid = (torch.arange(NC * L, device=q.device) < S).view(NC, L)
        q, k = (x.view(B, NH, NC, L, DQK) for x in (q, k))
        v = v.view(B, NH, NC, L, DV)
        i, log_f = (x.view(B, NH, NC, L) for x in (i, log_f))
        seg = segment_ids(reset).view(B, 1, NC, L)  # broadcast over heads
        seg_in = torch.cat([torch.zeros_like(seg[..., :1, -1]), seg[..., :-1, -1]], dim=-1)  # (B, 1, NC)

        b = torch.cumsum(log_f, dim=-1)  # b_t: log-decay from the chunk's start through t
        b_end = b[..., -1]

        # 1) What each chunk adds to the memory, stabilised by its own max (all chunks at once).
        seg_end = seg[..., -1:]
        log_w = (b_end[..., None] - b + i).masked_fill(~((seg == seg_end) & valid), -math.inf)
        m_loc = log_w.amax(dim=-1)  # finite: the chunk's last document always has a token in it
        kw = k * torch.exp(log_w - m_loc[..., None])[..., None]
        C_loc = kw.transpose(-1, -2) @ v  # (B, NH, NC, DQK, DV)
        n_loc = kw.sum(dim=-2)  # (B, NH, NC, DQK)
        carry = seg_end[..., 0] == seg_in  # no document starts inside the chunk: the old state survives

        # 2) Carry the state across chunks (the only sequential part): C_c = decay * C_{c-1} + C_loc.
        C_in, n_in, m_in = [], [], []
        for c in range(NC):
            C_in.append(C)
            n_in.append(n)
            m_in.append(m)
            log_w_prev = torch.where(carry[..., c], b_end[..., c] + m, -math.inf)
            m_new = torch.maximum(log_w_prev, m_loc[..., c])
            a_prev = torch.exp(log_w_prev - m_new)
            a_loc = torch.exp(m_loc[..., c] - m_new)
            C = a_prev[..., None, None] * C + a_loc[..., None, None] * C_loc[:, :, c]
            n = a_prev[..., None] * n + a_loc[..., None] * n_loc[:, :, c]
            m = m_new
        C_in, n_in, m_in = torch.stack(C_in, 2), torch.stack(n_in, 2), torch.stack(m_in, 2)

        # 3) Outputs: exact attention-like sum inside the chunk plus the read from the carried state.
        log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        same_doc = seg[..., :, None] == seg[..., None, :]
        log_d = log_d.masked_fill(~(causal & same_doc), -math.inf)
        log_w_inter = (b + m_in[..., None]).masked_fill(seg != seg_in[..., None], -math.inf)
        m_t = torch.maximum(log_d.amax(dim=-1), log_w_inter)
        scores = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m_t[..., None])
        a_inter = torch.exp(log_w_inter - m_t)
        num = scores @ v + a_inter[..., None] * (q @ C_in)
        den = scores.sum(dim=-1) + a_inter * (q @ n_in[..., None]).squeeze(-1)
        h = num / torch.maximum(den.abs(), torch.exp(-m_t))[..., None]  # xLSTM eq. (21) normaliser
        h = h.reshape(B, NH, NC * L, DV)[:, :, :S].to(out_dtype)
    if return_final_state:
        return h, (C, n, m)
    return h


def mlstm_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    state: Optional[MLSTMState] = None,
) -> tuple[Tensor, MLSTMState]:
    """One token of the stabilised mLSTM recurrence (for generation).

    q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH); state (C, n, m) as in `mlstm_chunkwise`
    or None (no memory). Returns h (B, NH, DV) in v's dtype and the new state.
    """
    B, NH, DQK = q.shape
    dtype = compute_dtype(q, k, v, i, f)
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, i, f = (x.to(dtype) for x in (q, k, v, i, f))
        if state is None:
            C, n, m = _empty_state(B, NH, DQK, v.shape[-1], dtype, q.device)
        else:
            C, n, m = (x.to(dtype) for x in state)
        k = k * DQK**-0.5
        log_f = F.logsigmoid(f)
        m_new = torch.maximum(log_f + m, i)  # xLSTM eq. (15): stabiliser state
        f_s = torch.exp(log_f + m - m_new)  # eq. (17): stabilised forget gate
        i_s = torch.exp(i - m_new)  # eq. (16): stabilised input gate
        C = f_s[..., None, None] * C + i_s[..., None, None] * (k[..., :, None] * v[..., None, :])  # eq. (19)
        n = f_s[..., None] * n + i_s[..., None] * k  # eq. (20)
        num = (q[..., :, None] * C).sum(-2)  # q^T C as multiply-sum: one fused kernel with the update under inductor
        den = (q * n).sum(dim=-1)
        h = num / torch.maximum(den.abs(), torch.exp(-m_new))[..., None]  # eq. (21)
    return h.to(out_dtype), (C, n, m_new)
