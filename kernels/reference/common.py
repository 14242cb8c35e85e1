"""Helpers shared by the reference ops: compute dtype and document-start masks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any input is float64 (exactness tests), else float32 (whatever the input: bf16 too)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def doc_starts_mask(
    doc_starts: Optional[Tensor], batch: int, seq_len: int, device: torch.device
) -> Optional[Tensor]:
    """Normalise `doc_starts` to a bool mask (B, S), True where a token begins a new document.

    Accepts either the mask itself (bool (B, S)) or cumulative sequence lengths `cu_seqlens`
    (int (N+1,), starting at 0 and ending at S) describing N documents packed into a single row
    (B must be 1). Returns None when `doc_starts` is None.
    """
    if doc_starts is None:
        return None
    if doc_starts.dtype == torch.bool:
        if tuple(doc_starts.shape) != (batch, seq_len):
            raise ValueError(
                f"doc_starts mask must have shape (B, S) = {(batch, seq_len)}, got {tuple(doc_starts.shape)}"
            )
        return doc_starts.to(device)
    if doc_starts.dim() != 1 or doc_starts.dtype.is_floating_point:
        raise ValueError("doc_starts must be a bool mask (B, S) or integer cu_seqlens (N+1,)")
    if batch != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but the batch has B={batch} rows")
    cu = doc_starts.to(device=device, dtype=torch.long)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to S={seq_len}, got {cu.tolist()}")
    mask = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
    starts = cu[:-1]
    mask[0, starts[starts < seq_len]] = True
    return mask


def segment_ids(reset: Tensor) -> Tensor:
    """Document index of every token (B, S): 0 for tokens that continue the initial state's document,
    k after the k-th document start. Two tokens share memory iff they share a segment id."""
    return torch.cumsum(reset.long(), dim=-1)
