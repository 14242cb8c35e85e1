"""Building blocks shared by the architectures: norms, causal conv, block-diagonal linear, gated FFNs,
RoPE, soft-capping and the init recipes."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from xlp import kernels
from xlp.kernels.reference.common import segment_ids
from xlp.xlstm_model.config import ModelConfig


# --------------------------------------------------------------------------------------------- init
def std_in(cfg: ModelConfig) -> float:
    """Std of embeddings and of projections that read the residual stream."""
    if cfg.init == "normal":
        return 0.02
    return math.sqrt(2.0 / (5.0 * cfg.d_model))  # small init (Nguyen & Salazar, 2019)


def std_out(cfg: ModelConfig) -> float:
    """Std of projections that write into the residual stream, scaled down with depth so the stream's
    variance does not grow with the number of blocks."""
    if cfg.init == "normal":
        return 0.02 / math.sqrt(2.0 * cfg.num_blocks)  # GPT-2
    return 2.0 / (cfg.num_blocks * math.sqrt(cfg.d_model))  # Wang init (as in the xLSTM papers)


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap): bounds x to (-cap, cap), ~identity near 0 (xLSTM 7B). cap 0 = off."""
    return cap * torch.tanh(x / cap) if cap else x


# -------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (as in the xLSTM NeurIPS blocks)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.layer_norm(x, self.weight, None, self.eps)


class MultiHeadNorm(nn.Module):
    """Normalises each head's vector on its own ("group norm" in xLSTM), then a per-channel weight.
    Heads are normalised separately because their memories have unrelated scales."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, kind: str = "layer"):
        super().__init__()
        self.num_heads, self.head_dim, self.eps, self.kind = num_heads, head_dim, eps, kind
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x: (..., NH, DH) -> (..., NH * DH)
        if self.kind == "rms":
            y = kernels.rms_norm(x, None, self.eps)
        else:
            y = kernels.layer_norm(x, None, None, self.eps)
        return y.flatten(-2) * self.weight


# ----------------------------------------------------------------------------------------- mixing
class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time: y_t = b + sum_j w_j * x_{t-j}, j = 0..K-1.

    Taps never reach into an earlier document (doc_starts), and a carried state (the last K-1
    inputs) lets the same module run token by token for generation.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size, channels))  # weight[j] multiplies x_{t-j}
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(kernel_size))

    def forward(
        self, x: Tensor, reset: Optional[Tensor] = None, state: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """x: (B, S, C); reset: bool (B, S) doc starts; state: (B, K-1, C) previous inputs or None.
        Returns y (B, S, C) and the new state."""
        B, S, C = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, C)
        full = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+S, C)
        if reset is None:
            seg_full = None
        else:  # carried inputs belong to segment 0, the document the state was in
            seg_full = torch.cat([reset.new_zeros(B, K - 1, dtype=torch.long), segment_ids(reset)], dim=1)
        y = self.bias.to(x.dtype).expand(B, S, C)
        for j in range(K):
            tap = full[:, K - 1 - j : K - 1 - j + S]  # x_{t-j}
            if seg_full is not None:
                same_doc = seg_full[:, K - 1 - j : K - 1 - j + S] == seg_full[:, K - 1 :]
                tap = tap * same_doc[..., None].to(tap.dtype)
            y = y + self.weight[j].to(x.dtype) * tap
        new_state = full[:, S:]  # the last K-1 inputs
        if seg_full is not None:  # drop inputs from before the last document start
            new_state = new_state * (seg_full[:, S:] == seg_full[:, -1:])[..., None].to(x.dtype)
        return y, new_state


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map (xLSTM's head-wise q/k/v projections): the input is cut into
    blocks of `blocksize` channels and each block has its own small matrix."""

    def __init__(self, dim: int, blocksize: int):
        super().__init__()
        self.blocksize = blocksize
        self.weight = nn.Parameter(torch.empty(dim // blocksize, blocksize, blocksize))

    def forward(self, x: Tensor) -> Tensor:
        xb = x.reshape(*x.shape[:-1], -1, self.blocksize)  # not unflatten (torch.compile fails on it in decode)
        return torch.einsum("...nb,nbc->...nc", xb, self.weight).flatten(-2)


class GatedFFN(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)). act=silu is SwiGLU (Shazeer, 2020);
    act=gelu is the GeGLU FFN of the xLSTM sLSTM block."""

    def __init__(self, dim: int, hidden: int, act: Callable[[Tensor], Tensor] = F.silu):
        super().__init__()
        self.act = act
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up fused: one matmul
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)

    def init_weights(self, cfg: ModelConfig) -> None:
        nn.init.normal_(self.gate_up.weight, std=std_in(cfg))
        nn.init.normal_(self.down.weight, std=std_out(cfg))


# ------------------------------------------------------------------------------------------- RoPE
def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (Su et al., 2021), rotate-half convention.
    x: (B, NH, S, DH); positions: (S,) or per row (B, S)."""
    dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (S, DH/2) or (B, S, DH/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # broadcast over heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
