"""The xLSTM-large block (xLSTM 7B, Beck et al., 2025): an mLSTM layer and a SwiGLU FFN, each
pre-RMSNorm and residual, built for throughput: dense q/k/v (q/k at half width), soft-capped
per-head gates, a sigmoid output gate and a per-head RMSNorm.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from xlp import kernels
from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model import sequence_parallel as seqpar
from xlp.xlstm_model.layers import GatedFFN, MultiHeadNorm, RMSNorm, soft_cap, std_in, std_out


class XLSTMLargeBlock(nn.Module):
    # set by LanguageModel.set_sequence_parallel: x holds this rank's slice of each row
    sp: Optional[seqpar.SeqParallel] = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, nh = cfg.d_model, cfg.num_heads
        self.num_heads, self.qk_dim, self.v_dim = nh, cfg.qk_dim, cfg.v_dim
        self.norm = RMSNorm(d, cfg.norm_eps)
        # q, k (qk_dim each), v and the output gate o (v_dim each) in one matmul
        self.qkvo = nn.Linear(d, 2 * self.qk_dim + 2 * self.v_dim, bias=False)
        self.if_gates = nn.Linear(d, 2 * nh, bias=True)  # i~, f~ per head
        self.head_norm = MultiHeadNorm(nh, self.v_dim // nh, cfg.norm_eps, cfg.resolved_head_norm)
        self.out = nn.Linear(self.v_dim, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = GatedFFN(d, cfg.ffn_dim, act=F.silu)  # SwiGLU

    def init_weights(self) -> None:
        cfg, nh = self.cfg, self.num_heads
        nn.init.normal_(self.qkvo.weight, std=std_in(cfg))
        nn.init.zeros_(self.if_gates.weight)
        with torch.no_grad():
            # xLSTM 7B: input-gate bias -10 keeps the exponential input gate small early in training;
            # forget bias linspace(3, 6) over heads as in the NeurIPS init.
            self.if_gates.bias[:nh].fill_(-10.0)
            self.if_gates.bias[nh:].copy_(torch.linspace(3.0, 6.0, nh))
        nn.init.normal_(self.out.weight, std=std_out(cfg))
        self.ffn.init_weights(cfg)

    def _mix_in(self, x: Tensor):
        B, S, _ = x.shape
        x_n = self.norm(x)
        q, k, v, o = self.qkvo(x_n).split([self.qk_dim, self.qk_dim, self.v_dim, self.v_dim], dim=-1)
        cap = self.cfg.resolved_gate_soft_cap
        i, f = soft_cap(self.if_gates(x_n), cap).chunk(2, dim=-1)  # gates soft-capped at 15

        def heads(t: Tensor) -> Tensor:
            return t.view(B, S, self.num_heads, -1).transpose(1, 2)

        return heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), o

    def _mix_out(self, x: Tensor, h: Tensor, o: Tensor) -> Tensor:
        """h: (B, S, NH, DHV) -> residual update, then the FFN sublayer."""
        x = x + self.out(torch.sigmoid(o) * self.head_norm(h))  # sigmoid output gate
        return x + self.ffn(self.ffn_norm(x))

    def forward(
        self, x: Tensor, reset: Optional[Tensor] = None, state: Optional[Any] = None, return_state: bool = False
    ):
        q, k, v, i, f, o = self._mix_in(x)
        if self.sp is not None and state is None and not return_state:
            h = seqpar.mlstm_chunkwise(q, k, v, i, f, sp=self.sp, chunk_size=self.cfg.mlstm_chunk_size, doc_starts=reset)
            return self._mix_out(x, h.transpose(1, 2), o)
        out = kernels.mlstm_chunkwise(
            q, k, v, i, f,
            chunk_size=self.cfg.mlstm_chunk_size,
            initial_state=state,
            return_final_state=return_state,
            doc_starts=reset,
        )
        h, state = out if return_state else (out, None)
        y = self._mix_out(x, h.transpose(1, 2), o)
        return (y, state) if return_state else y

    def step(self, x: Tensor, state: Optional[Any]) -> tuple[Tensor, Any]:
        q, k, v, i, f, o = self._mix_in(x[:, None])
        h, state = kernels.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], state)
        return self._mix_out(x[:, None], h[:, None], o)[:, 0], state

    def step_fused(self, x: Tensor, state: Any, *, pdl: bool = False, mix: Optional[tuple[int, int]] = None) -> Tensor:
        """`step` as five fused kernels (the same equations): x (B, D) -> the block's output; the
        state (C, n, m), contiguous float32, is updated in place. pdl, mix: the kernels' launch
        options (kernels.decode_linear / mlstm_decode_mix)."""
        h = kernels.mlstm_decode_mix(
            x, kernels.decode_linear(x, self.qkvo.weight, norm_weight=self.norm.weight, norm_eps=self.norm.eps, pdl=pdl),
            self.if_gates.weight, self.if_gates.bias, state,
            num_heads=self.num_heads, norm_weight=self.norm.weight, norm_eps=self.norm.eps,
            gate_soft_cap=self.cfg.resolved_gate_soft_cap, head_norm_weight=self.head_norm.weight,
            head_norm_eps=self.head_norm.eps, head_norm=self.head_norm.kind, pdl=pdl, mix=mix,
        )
        x = kernels.decode_linear(h, self.out.weight, residual=x, pdl=pdl)
        a = kernels.decode_linear(x, self.ffn.gate_up.weight, norm_weight=self.ffn_norm.weight,
                                  norm_eps=self.ffn_norm.eps, glu=True, pdl=pdl)  # SwiGLU
        return kernels.decode_linear(a, self.ffn.down.weight, residual=x, pdl=pdl)
