"""A Llama-style Transformer block (Touvron et al., 2023) as the baseline: pre-RMSNorm, RoPE,
causal SDPA attention, SwiGLU FFN, no biases. Its state for generation is the KV cache."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from xlp.kernels.reference.common import segment_ids
from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.layers import GatedFFN, RMSNorm, rope, std_in, std_out


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = GatedFFN(d, cfg.ffn_dim, act=F.silu)

    def init_weights(self) -> None:
        nn.init.normal_(self.qkv.weight, std=std_in(self.cfg))
        nn.init.normal_(self.o.weight, std=std_out(self.cfg))
        self.ffn.init_weights(self.cfg)

    def forward(
        self, x: Tensor, reset: Optional[Tensor] = None, state: Optional[Any] = None, return_state: bool = False
    ):
        """state: KV cache (k, v), each (B, NH, T, DH), of the T tokens seen so far, or None."""
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0 if state is None else state[0].shape[2]
        positions = torch.arange(past, past + S, device=x.device)
        if reset is not None:
            # Positions restart at every document start, so a packed document is encoded exactly as
            # it would be alone (RoPE is relative in exact arithmetic, not in float32 angles).
            last_start = torch.where(reset, positions, torch.zeros_like(positions)).cummax(dim=1).values
            positions = positions - last_start  # (B, S)
        q, k = rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta)
        if state is not None:
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)

        if reset is not None:
            if state is not None:
                raise NotImplementedError("doc_starts together with a KV cache is not supported")
            # Block-diagonal causal mask: attend only to earlier tokens of the same document.
            seg = segment_ids(reset)
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past and S > 1:  # continuing from a cache: query t sees all cached keys and keys <= t
            mask = torch.ones(S, past + S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=(S > 1))
        x = x + self.o(h.transpose(1, 2).reshape(B, S, D))
        x = x + self.ffn(self.ffn_norm(x))
        return (x, (k, v)) if return_state else x

    def step(self, x: Tensor, state: Optional[Any]) -> tuple[Tensor, Any]:
        y, state = self.forward(x[:, None], state=state, return_state=True)
        return y[:, 0], state
