"""Sequence parallelism for the mLSTM: one sequence over the N ranks of a group, the state passed exactly.

Rank j of a group holds tokens [j*S/N, (j+1)*S/N) of every row. Per mLSTM layer each rank

1. computes its slice's summary: the state (C, n, m) the slice would hand on from a zero start (what the
   chunkwise op returns with `return_final_state=True`, here in closed form: a weighted sum of k v^T over
   the slice's last document, O(S DQK) memory, none of the op's per-chunk activations), plus the slice's
   total log forget decay L (sum of log sigmoid f) and whether a document starts in it (then nothing
   before the slice survives it);
2. all-gathers these summaries over the group: ONE differentiable all-gather per layer, of
   B x NH x (DQK*DV + DQK + 3) numbers, whatever S is;
3. folds the summaries of the ranks before it, in log space with the max-stabiliser m (the stored C is
   the true one times exp(-m)): passing slice j, C_end = exp(L_j) C_in + C_j, and a document start in
   slice j drops C_in;
4. runs the chunkwise op on its slice again, from that state, with its document starts.

Autograd sends the state gradients back through the all-gather: its backward all-reduce-sums the
stacked gradients over the group and hands each rank its own part (gloo has no reduce-scatter).
The kernels stay single-device ops; this module only moves and combines their states. Cost per layer:
the summary (two matmuls over the slice) and one all-gather, besides the op itself.

The NeurIPS mLSTM block's causal conv reads the K-1 inputs before each token; rank j gets rank j-1's
last K-1 inputs (cut at a document start) by the same differentiable all-gather (`halo`).

Every rank must run the same layers in the same order (the collectives pair up across the group), and
every rank's gathered tensor must reach its loss, so that every rank runs each backward all-reduce:
rank 0, which starts from no state, ties its gathered tensor into its output with a zero-size term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from xlp import kernels
from xlp.kernels.reference.common import compute_dtype, segment_ids


@dataclass(frozen=True)
class SeqParallel:
    """The sequence-parallel group this rank belongs to: `group` (a torch.distributed process group;
    None = the default group), this rank's index in it (`rank`, 0 holds the first tokens) and its
    size N."""

    group: Any
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"sequence parallel: rank {self.rank} is not in a group of size {self.size}")

    def bounds(self, seq_len: int) -> tuple[int, int]:
        """[start, end) of this rank's tokens in a row of seq_len tokens (ValueError unless N divides it)."""
        if seq_len % self.size:
            raise ValueError(f"sequence parallel: the sequence length {seq_len} does not split over "
                             f"{self.size} ranks; use a data.seq_len divisible by train.sequence_parallel")
        part = seq_len // self.size
        return self.rank * part, (self.rank + 1) * part

    def take(self, t: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of t along the sequence dimension `dim`."""
        start, end = self.bounds(t.shape[dim])
        return t.narrow(dim, start, end - start)


class _AllGather(torch.autograd.Function):
    """all_gather forward; backward: the group's gradients of the stacked result summed (all_reduce),
    this rank's part returned. Every rank's loss may depend on every rank's input."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, rank: int, size: int) -> Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank = group, rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def all_gather(x: Tensor, sp: SeqParallel) -> Tensor:
    """(N, *x.shape): every rank's x, differentiable (see _AllGather)."""
    if sp.size == 1:
        return x[None]
    return _GATHER[0](x, sp)


def _gather(x: Tensor, sp: SeqParallel) -> Tensor:
    return _AllGather.apply(x, sp.group, sp.rank, sp.size)


_GATHER = [_gather]  # what all_gather calls: _gather, or (once blocks are compiled) its Dynamo-disabled form


def keep_exchange_out_of_compile() -> None:
    """Compiled blocks (LanguageModel.compile_blocks) with sequence parallelism: Dynamo does not trace the
    exchange; it ends the block's graph before it and starts another after it (one graph break per
    exchange), so the collective and its backward run eagerly, in the same order on every rank, and the
    math on either side is compiled. Called before any compile (torch.compiler imports Dynamo: seconds,
    which an uncompiled run does not pay)."""
    if _GATHER[0] is _gather:
        _GATHER[0] = torch.compiler.disable(_gather)


def _tie(out: Tensor, unused: Tensor) -> Tensor:
    """out, with `unused` in its graph at no cost (a zero-size sum), so that this rank runs the
    backward collective of `unused` like the others."""
    return out + unused.narrow(-1, 0, 0).sum().to(out.dtype)


def _summary(k: Tensor, v: Tensor, i: Tensor, f: Tensor, reset: Optional[Tensor]) -> Tensor:
    """The slice's summary (B, NH, DQK*DV + DQK + 3): the final state (C, n, m) from a zero start, in the
    kernels' conventions (C, n over k / sqrt(DQK), times exp(-m)), its total log decay L and whether a
    document starts in it (1.0 / 0.0)."""
    B, NH, S, DQK = k.shape
    dtype = compute_dtype(k, v, i, f)
    with torch.autocast(k.device.type, enabled=False):
        k, v, i, f = (x.to(dtype) for x in (k, v, i, f))
        log_f = F.logsigmoid(f)
        # log-decay from token s to the slice's end (sum of log f after s), summed from the end: the
        # tokens that weigh most are near the end, where these sums are short and exact
        after = torch.flip(torch.cumsum(torch.flip(log_f, [-1]), -1), [-1]) - log_f
        log_w = after + i
        if reset is not None:  # only the slice's last document reaches its end
            seg = segment_ids(reset)[:, None, :]
            log_w = log_w.masked_fill(seg != seg[..., -1:], -math.inf)
        m = log_w.amax(-1)
        kw = k * (DQK**-0.5) * torch.exp(log_w - m[..., None])[..., None]
        C = kw.transpose(-1, -2) @ v
        n = kw.sum(-2)
        log_decay = log_f.sum(-1)
        cut = (reset.any(-1).to(dtype)[:, None].expand(B, NH) if reset is not None
               else torch.zeros(B, NH, dtype=dtype, device=k.device))
        return torch.cat([C.flatten(-2), n, m[..., None], log_decay[..., None], cut[..., None]], dim=-1)


def _fold(gathered: Tensor, upto: int, dqk: int, dv: int) -> tuple[Tensor, Tensor, Tensor]:
    """The state entering slice `upto` from the summaries of slices 0..upto-1 (gathered: N x B x NH x X)."""
    C = n = m = None
    for j in range(upto):
        part = gathered[j]
        Cj = part[..., : dqk * dv].unflatten(-1, (dqk, dv))
        nj = part[..., dqk * dv : dqk * dv + dqk]
        mj, Lj, cut = part[..., -3], part[..., -2], part[..., -1] > 0.5
        if C is None:  # the first slice starts from nothing: its summary is the state
            C, n, m = Cj, nj, mj
            continue
        # log-weight of the incoming state at the slice's end; -inf when a document starts in the slice
        log_prev = torch.where(cut, torch.full_like(m, -math.inf), Lj + m)
        m_new = torch.maximum(log_prev, mj)
        a_prev, a_loc = torch.exp(log_prev - m_new), torch.exp(mj - m_new)
        C = a_prev[..., None, None] * C + a_loc[..., None, None] * Cj
        n = a_prev[..., None] * n + a_loc[..., None] * nj
        m = m_new
    return C, n, m


def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    sp: SeqParallel,
    chunk_size: int = 64,
    doc_starts: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """xlp.kernels.mlstm_chunkwise on this rank's slice of the sequence, started from the exact state
    the group's earlier slices leave (collective over sp.group). Shapes as the kernel's, with S the
    slice's length; doc_starts: this slice's bool mask (B, S) or None. Returns h (B, NH, S, DV)."""
    if sp.size == 1:
        return kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk_size, doc_starts=doc_starts, backend=backend)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    reset = kernels.doc_starts_mask(doc_starts, B, S, q.device)
    if sp.rank < sp.size - 1:
        summary = _summary(k, v, i, f, reset)
    else:  # no rank reads the last slice's summary: send zeros (a leaf, so this rank's backward runs too)
        width = DQK * DV + DQK + 3
        summary = torch.zeros(B, NH, width, dtype=compute_dtype(q, k, v, i, f), device=q.device,
                              requires_grad=torch.is_grad_enabled())
    gathered = all_gather(summary, sp)
    if sp.rank == 0:
        h = kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk_size, doc_starts=reset, backend=backend)
        return _tie(h, gathered)
    state = _fold(gathered, sp.rank, DQK, DV)
    return kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk_size, initial_state=state, doc_starts=reset,
                                   backend=backend)


def halo(x: Tensor, reset: Optional[Tensor], width: int, sp: SeqParallel) -> Optional[Tensor]:
    """The `width` inputs before this rank's slice (B, width, C), from the previous rank, zeroed
    before a document start there (a causal conv's state); None on rank 0 (collective).
    x: (B, S, C) this rank's inputs; reset: its doc-start mask (B, S) or None."""
    if width == 0 or sp.size == 1:
        return None
    B, S, _ = x.shape
    if S < width:
        raise ValueError(f"sequence parallel: a slice of {S} tokens is shorter than the causal conv's reach "
                         f"of {width} tokens (model.conv_kernel - 1); use fewer train.sequence_parallel ranks "
                         "or a longer data.seq_len")
    tail = x[:, S - width:]
    if reset is not None:  # only the last document's inputs carry on
        seg = segment_ids(reset)
        tail = tail * (seg[:, S - width:] == seg[:, -1:])[..., None].to(x.dtype)
    gathered = all_gather(tail, sp)
    if sp.rank == 0:
        return _tie(torch.zeros_like(tail), gathered)
    return gathered[sp.rank - 1]
