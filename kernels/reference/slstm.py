"""Reference sLSTM: the scalar-memory cell of xLSTM (Beck et al., 2024) with exponential gating.

Per head (block-diagonal recurrent weights R, one DH x DH block per gate and head), with the
input contributions W x + b given as pre-activations and gate order (i, f, z, o):

    i~, f~, z~, o~ = (W x_t + b) + R h_{t-1}                  xLSTM eqs. (11)-(14)
    z_t = tanh(z~)   o_t = sigmoid(o~)
    log i_t = i~     log f_t = logsigmoid(f~)  ("sigmoid")  or  f~  ("exp")
    m_t = max(log f_t + m_{t-1}, log i_t)                      eq. (15) stabiliser
    i'_t = exp(log i_t - m_t)   f'_t = exp(log f_t + m_{t-1} - m_t)     eqs. (16), (17)
    c_t = f'_t c_{t-1} + i'_t z_t                              eq. (8)
    n_t = f'_t n_{t-1} + i'_t                                  eq. (9)
    h_t = o_t * c_t / n_t                                      eq. (10)

State = (h, c, n, m), each (B, NH, DH), float32 (float64 for float64 inputs). None means the empty
state h = c = n = 0, m = -inf. doc_starts[b, t] True resets the state to empty before token t.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from xlp.kernels.reference.common import compute_dtype, doc_starts_mask

SLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]  # (h, c, n, m)
FORGET_GATES = ("sigmoid", "exp")


def _empty_state(batch: int, heads: int, dh: int, dtype: torch.dtype, device) -> SLSTMState:
    zeros = torch.zeros(batch, heads, dh, dtype=dtype, device=device)
    return zeros, zeros, zeros, torch.full_like(zeros, -math.inf)


def _cell(gates: Tensor, R: Tensor, state: SLSTMState, forget_gate: str) -> SLSTMState:
    """One stabilised sLSTM update in the compute dtype. gates: (B, 4, NH, DH)."""
    h, c, n, m = state
    raw = gates + torch.einsum("bhd,ghde->bghe", h, R)  # eqs. (11)-(14): input part + recurrent part
    i_raw, f_raw, z_raw, o_raw = raw.unbind(dim=1)
    log_f = F.logsigmoid(f_raw) if forget_gate == "sigmoid" else f_raw
    m_new = torch.maximum(log_f + m, i_raw)  # eq. (15)
    i_s = torch.exp(i_raw - m_new)  # eq. (16)
    f_s = torch.exp(log_f + m - m_new)  # eq. (17)
    c = f_s * c + i_s * torch.tanh(z_raw)  # eq. (8)
    n = f_s * n + i_s  # eq. (9)
    h = torch.sigmoid(o_raw) * (c / n)  # eq. (10); n >= i'_t > 0, so no division by zero
    return h, c, n, m_new


def _check(gates: Tensor, R: Tensor, forget_gate: str, seq: bool) -> None:
    if forget_gate not in FORGET_GATES:
        raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
    want = 5 if seq else 4
    if gates.dim() != want or gates.shape[-3] != 4:
        layout = "(B, S, 4, NH, DH)" if seq else "(B, 4, NH, DH)"
        raise ValueError(f"gates must be {layout} with gate order (i, f, z, o), got {tuple(gates.shape)}")
    NH, DH = gates.shape[-2:]
    if tuple(R.shape) != (4, NH, DH, DH):
        raise ValueError(f"R must be (4, NH, DH, DH) = {(4, NH, DH, DH)}, got {tuple(R.shape)}")


def slstm_sequence(
    gates: Tensor,
    R: Tensor,
    *,
    forget_gate: str = "sigmoid",
    initial_state: Optional[SLSTMState] = None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, SLSTMState]]:
    """Run the sLSTM over a sequence.

    gates: (B, S, 4, NH, DH) input pre-activations W x_t + b, gate order (i, f, z, o).
    R: (4, NH, DH, DH) recurrent weights; gate g of head j adds h_{t-1}[j] @ R[g, j].
    forget_gate: "sigmoid" or "exp". doc_starts: bool (B, S) or cu_seqlens (N+1,) for B = 1.
    Returns h (B, S, NH, DH) in the gates' dtype, and the final state (h, c, n, m) if asked.
    """
    _check(gates, R, forget_gate, seq=True)
    B, S, _, NH, DH = gates.shape
    dtype = compute_dtype(gates, R)
    out_dtype = gates.dtype
    with torch.autocast(gates.device.type, enabled=False):
        gates, R = gates.to(dtype), R.to(dtype)
        if initial_state is None:
            state = _empty_state(B, NH, DH, dtype, gates.device)
        else:
            state = tuple(x.to(dtype) for x in initial_state)
        reset = doc_starts_mask(doc_starts, B, S, gates.device)
        empty = _empty_state(B, NH, DH, dtype, gates.device)
        hs = []
        for t in range(S):  # the recurrence is nonlinear in h_{t-1}: no parallel form exists
            if reset is not None:
                r = reset[:, t, None, None]
                state = tuple(torch.where(r, e, s) for e, s in zip(empty, state))
            state = _cell(gates[:, t], R, state, forget_gate)
            hs.append(state[0])
        h = torch.stack(hs, dim=1).to(out_dtype)
    if return_final_state:
        return h, state
    return h


def slstm_step(
    gates: Tensor,
    R: Tensor,
    state: Optional[SLSTMState] = None,
    *,
    forget_gate: str = "sigmoid",
) -> tuple[Tensor, SLSTMState]:
    """One sLSTM token. gates: (B, 4, NH, DH); R: (4, NH, DH, DH); state (h, c, n, m) or None.
    Returns h (B, NH, DH) in the gates' dtype and the new state."""
    _check(gates, R, forget_gate, seq=False)
    B, _, NH, DH = gates.shape
    dtype = compute_dtype(gates, R)
    with torch.autocast(gates.device.type, enabled=False):
        g, Rc = gates.to(dtype), R.to(dtype)
        st = _empty_state(B, NH, DH, dtype, gates.device) if state is None else tuple(x.to(dtype) for x in state)
        st = _cell(g, Rc, st, forget_gate)
    return st[0].to(gates.dtype), st
