"""The kernel ops (see xlp.kernels): each public function dispatches to a backend."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

# xlp.kernels re-exports the backend controls and doc_starts_mask from here, beside the ops below
from xlp.kernels.dispatch import BACKENDS, default_backend, resolve, set_default_backend, use_backend  # noqa: F401
from xlp.kernels.reference.common import doc_starts_mask  # noqa: F401
from xlp.kernels.reference.mlstm import MLSTMState
from xlp.kernels.reference.slstm import SLSTMState


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
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, MLSTMState]]:
    """Stabilised mLSTM in its parallel (attention-like) form, O(S^2) memory: the ground truth.

    q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S) input/forget gate pre-activations.
    Returns h (B, NH, S, DV) in v's dtype, plus the final state (C, n, m) if return_final_state.
    """
    fn = resolve("mlstm_parallel", backend, q)
    return fn(q, k, v, i, f, initial_state=initial_state, return_final_state=return_final_state, doc_starts=doc_starts)


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
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, MLSTMState]]:
    """Stabilised mLSTM, chunkwise: exact inside chunks of `chunk_size`, recurrent state between them.

    O(S * chunk_size) memory; any S (padded internally) and any chunk size. Same shapes and results
    as `mlstm_parallel`: h (B, NH, S, DV), and the final state (C, n, m) if return_final_state.
    """
    fn = resolve("mlstm_chunkwise", backend, q)
    return fn(
        q, k, v, i, f,
        chunk_size=chunk_size,
        initial_state=initial_state,
        return_final_state=return_final_state,
        doc_starts=doc_starts,
    )


def mlstm_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    state: Optional[MLSTMState] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, MLSTMState]:
    """One token of the mLSTM recurrence (generation). q, k: (B, NH, DQK); v: (B, NH, DV);
    i, f: (B, NH); state (C, n, m) or None. Returns h (B, NH, DV) and the new state."""
    fn = resolve("mlstm_step", backend, q)
    return fn(q, k, v, i, f, state)


def slstm_sequence(
    gates: Tensor,
    R: Tensor,
    *,
    forget_gate: str = "sigmoid",
    initial_state: Optional[SLSTMState] = None,
    return_final_state: bool = False,
    doc_starts: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, SLSTMState]]:
    """sLSTM over a sequence (scalar memory, exponential input gate, stabiliser state m).

    gates: (B, S, 4, NH, DH) input pre-activations W x + b in gate order (i, f, z, o);
    R: (4, NH, DH, DH) block-diagonal recurrent weights (gate g of head j adds h_{t-1}[j] @ R[g, j]);
    forget_gate: "sigmoid" | "exp"; state (h, c, n, m), each (B, NH, DH), None = empty (m = -inf).
    Returns h (B, S, NH, DH) in the gates' dtype, plus the final state if return_final_state.
    """
    fn = resolve("slstm_sequence", backend, gates)
    return fn(
        gates, R,
        forget_gate=forget_gate,
        initial_state=initial_state,
        return_final_state=return_final_state,
        doc_starts=doc_starts,
    )


def slstm_step(
    gates: Tensor,
    R: Tensor,
    state: Optional[SLSTMState] = None,
    *,
    forget_gate: str = "sigmoid",
    backend: Optional[str] = None,
) -> tuple[Tensor, SLSTMState]:
    """One sLSTM token. gates: (B, 4, NH, DH); R: (4, NH, DH, DH); state (h, c, n, m) or None.
    Returns h (B, NH, DH) and the new state."""
    fn = resolve("slstm_step", backend, gates)
    return fn(gates, R, state, forget_gate=forget_gate)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, *, backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dim. x: (..., D); weight: (D,) or None. Returns x's dtype."""
    return resolve("rms_norm", backend, x)(x, weight, eps)


def layer_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5, *, backend: Optional[str] = None
) -> Tensor:
    """LayerNorm over the last dim. x: (..., D); weight, bias: (D,) or None. Returns x's dtype."""
    return resolve("layer_norm", backend, x)(x, weight, bias, eps)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    soft_cap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Mean cross-entropy of (hidden @ weight^T), optionally soft-capped c*tanh(z/c), over targets
    != ignore_index. hidden: (..., D); weight: (V, D); targets: (...). Returns a float32 scalar."""
    fn = resolve("linear_cross_entropy", backend, hidden)
    return fn(hidden, weight, targets, ignore_index=ignore_index, soft_cap=soft_cap)


# --------------------------------------------------------------------------- fused one-token decode
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
    backend: Optional[str] = None,
) -> Tensor:
    """Matrix-vector product of a decode step with its neighbours fused: x (B, K), weight (N, K) ->
    residual + soft_cap(glu(RMSNorm(x) @ weight^T + bias)) (B, N, or N/2 with glu: silu of the first
    half times the second). Each part is optional (norm when norm_weight is given). No autograd.
    pdl: Triton on a Hopper-or-later GPU launches the kernel with programmatic dependent launch
    (it overlaps its predecessor; no effect elsewhere)."""
    fn = resolve("decode_linear", backend, x)
    return fn(x, weight, norm_weight=norm_weight, norm_eps=norm_eps, bias=bias, glu=glu, soft_cap=soft_cap,
              residual=residual, pdl=pdl)


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
    backend: Optional[str] = None,
) -> Tensor:
    """One token of an xLSTM-large block's mLSTM cell: gates from RMSNorm(x), the stabilised state
    update (state (C, n, m), float32, updated IN PLACE), read-out, per-head norm and sigmoid output
    gate. x (B, D); qkvo (B, 2 DQK + 2 DV) = [q | k | v | o]. Returns (B, DV) in x's dtype. No autograd.
    Launch options of the Triton kernel (no effect on the result, nor on the reference): pdl as for
    decode_linear; mix = (C elements per state tile, warps), None: timed on the first GPU call."""
    fn = resolve("mlstm_decode_mix", backend, x)
    return fn(x, qkvo, gate_weight, gate_bias, state, num_heads=num_heads, norm_weight=norm_weight,
              norm_eps=norm_eps, gate_soft_cap=gate_soft_cap, head_norm_weight=head_norm_weight,
              head_norm_eps=head_norm_eps, head_norm=head_norm, pdl=pdl, mix=mix)
