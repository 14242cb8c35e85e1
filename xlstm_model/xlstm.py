"""The NeurIPS xLSTM blocks (Beck et al., 2024): the mLSTM block (pre up-projection, Fig. 10) and the
sLSTM block (post up-projection, Fig. 9). xLSTM[a:b] stacks them by `model.slstm_at`.

Every block maps (B, S, D) -> (B, S, D) residually and can carry a recurrent state:
`forward(x, reset, state, return_state)` for whole sequences and `step(x, state)` for one token.
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
from xlp.xlstm_model.layers import CausalConv1d, GatedFFN, HeadwiseLinear, LayerNorm, MultiHeadNorm, std_in, std_out


class MLSTMBlock(nn.Module):
    """LayerNorm -> up-projection (x2) into a cell branch and a gate branch z;
    cell branch: causal conv + swish -> head-wise q, k (from the conv output) and v (from before it)
    -> mLSTM -> multi-head norm + learnable skip; output gate swish(z); down-projection; residual."""

    # set by LanguageModel.set_sequence_parallel: x holds this rank's slice of each row
    sp: Optional[seqpar.SeqParallel] = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, inner, nh = cfg.d_model, cfg.mlstm_inner_dim, cfg.num_heads
        self.num_heads, self.head_dim = nh, inner // nh
        self.norm = LayerNorm(d, cfg.norm_eps)
        self.up = nn.Linear(d, 2 * inner, bias=False)
        self.conv = CausalConv1d(inner, cfg.conv_kernel)
        self.q = HeadwiseLinear(inner, cfg.qkv_blocksize)
        self.k = HeadwiseLinear(inner, cfg.qkv_blocksize)
        self.v = HeadwiseLinear(inner, cfg.qkv_blocksize)
        self.gates = nn.Linear(3 * inner, 2 * nh, bias=True)  # (i~, f~) per head from [q, k, v]
        self.head_norm = MultiHeadNorm(nh, self.head_dim, cfg.norm_eps, "layer")
        self.skip = nn.Parameter(torch.ones(inner))
        self.down = nn.Linear(inner, d, bias=False)

    def init_weights(self) -> None:
        cfg = self.cfg
        nn.init.normal_(self.up.weight, std=std_in(cfg))
        for proj in (self.q, self.k, self.v):
            nn.init.normal_(proj.weight, std=std_in(cfg))
        # Gates start input-independent: forget bias linspace(3, 6) over heads (long memory at init,
        # heads spread over time scales), input bias ~N(0, 0.1) (xLSTM NeurIPS init).
        nn.init.zeros_(self.gates.weight)
        nh = self.num_heads
        with torch.no_grad():
            self.gates.bias[:nh].normal_(0.0, 0.1)
            self.gates.bias[nh:].copy_(torch.linspace(3.0, 6.0, nh))
        nn.init.normal_(self.down.weight, std=std_out(cfg))

    def _mix_in(self, x: Tensor, reset: Optional[Tensor], conv_state: Optional[Tensor],
                sp: Optional[seqpar.SeqParallel] = None):
        """(B, S, D) -> per-head q, k, v (B, NH, S, DH), gates i, f (B, NH, S), and what the output needs."""
        B, S, _ = x.shape
        x_m, z = self.up(self.norm(x)).chunk(2, dim=-1)
        if sp is not None:  # the conv reads the previous rank's last inputs
            conv_state = seqpar.halo(x_m, reset, self.conv.kernel_size - 1, sp)
        x_c, conv_state = self.conv(x_m, reset, conv_state)
        x_c = F.silu(x_c)
        q, k, v = self.q(x_c), self.k(x_c), self.v(x_m)
        i, f = self.gates(torch.cat([q, k, v], dim=-1)).chunk(2, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.view(B, S, self.num_heads, -1).transpose(1, 2)

        return heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), x_c, z, conv_state

    def _mix_out(self, x: Tensor, h: Tensor, x_c: Tensor, z: Tensor) -> Tensor:
        """h: (B, S, NH, DH) cell output -> residual update of x (B, S, D)."""
        h = self.head_norm(h) + self.skip * x_c  # learnable skip around the cell
        h = h * F.silu(z)  # output gate
        return x + self.down(h)

    def forward(
        self, x: Tensor, reset: Optional[Tensor] = None, state: Optional[Any] = None, return_state: bool = False
    ):
        conv_state, cell_state = state if state is not None else (None, None)
        sp = self.sp if state is None and not return_state else None
        if sp is not None:
            q, k, v, i, f, x_c, z, _ = self._mix_in(x, reset, None, sp)
            h = seqpar.mlstm_chunkwise(q, k, v, i, f, sp=sp, chunk_size=self.cfg.mlstm_chunk_size, doc_starts=reset)
            return self._mix_out(x, h.transpose(1, 2), x_c, z)
        q, k, v, i, f, x_c, z, conv_state = self._mix_in(x, reset, conv_state)
        out = kernels.mlstm_chunkwise(
            q, k, v, i, f,
            chunk_size=self.cfg.mlstm_chunk_size,
            initial_state=cell_state,
            return_final_state=return_state,
            doc_starts=reset,
        )
        h, cell_state = out if return_state else (out, None)
        y = self._mix_out(x, h.transpose(1, 2), x_c, z)
        return (y, (conv_state, cell_state)) if return_state else y

    def step(self, x: Tensor, state: Optional[Any]) -> tuple[Tensor, Any]:
        """One token: x (B, D) -> (B, D), using the recurrent mLSTM kernel."""
        conv_state, cell_state = state if state is not None else (None, None)
        q, k, v, i, f, x_c, z, conv_state = self._mix_in(x[:, None], None, conv_state)
        h, cell_state = kernels.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], cell_state)
        y = self._mix_out(x[:, None], h[:, None], x_c, z)
        return y[:, 0], (conv_state, cell_state)


class SLSTMBlock(nn.Module):
    """LayerNorm -> causal conv + swish (feeds the i, f gates) -> head-wise gate projections (z, o
    read the normed input) -> sLSTM with block-diagonal recurrence -> group norm; residual.
    Then LayerNorm -> gated FFN (GeLU, factor 4/3) -> residual (the post up-projection)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, nh = cfg.d_model, cfg.slstm_num_heads
        self.num_heads, self.head_dim = nh, d // nh
        dh = self.head_dim
        self.norm = LayerNorm(d, cfg.norm_eps)
        self.conv = CausalConv1d(d, cfg.conv_kernel)
        self.w_gates = nn.Parameter(torch.empty(4, nh, dh, dh))  # head-wise input weights, gates (i, f, z, o)
        self.b_gates = nn.Parameter(torch.zeros(4, nh, dh))
        self.R = nn.Parameter(torch.zeros(4, nh, dh, dh))  # block-diagonal recurrent weights
        self.group_norm = MultiHeadNorm(nh, dh, cfg.norm_eps, "layer")
        self.ffn_norm = LayerNorm(d, cfg.norm_eps)
        self.ffn = GatedFFN(d, cfg.slstm_ffn_dim, act=F.gelu)

    def init_weights(self) -> None:
        cfg = self.cfg
        nn.init.normal_(self.w_gates, std=std_in(cfg))
        nn.init.zeros_(self.R)  # the recurrence starts off and is learned
        with torch.no_grad():
            self.b_gates.zero_()
            # forget bias linspace(3, 6) within each head: a spread of memory time scales
            self.b_gates[1].copy_(torch.linspace(3.0, 6.0, self.head_dim).expand(self.num_heads, -1))
        self.ffn.init_weights(cfg)

    def _gates(self, x: Tensor, reset: Optional[Tensor], conv_state: Optional[Tensor]):
        B, S, _ = x.shape
        x_n = self.norm(x)
        x_c, conv_state = self.conv(x_n, reset, conv_state)
        x_c = F.silu(x_c)
        # xLSTM eqs. (11)-(14), input part: i and f read the conv features, z and o the normed input.
        src = torch.stack([x_c, x_c, x_n, x_n], dim=2).view(B, S, 4, self.num_heads, self.head_dim)
        gates = torch.einsum("bsghd,ghde->bsghe", src, self.w_gates) + self.b_gates
        return gates, conv_state

    def _out(self, x: Tensor, h: Tensor) -> Tensor:
        x = x + self.group_norm(h)
        return x + self.ffn(self.ffn_norm(x))

    def forward(
        self, x: Tensor, reset: Optional[Tensor] = None, state: Optional[Any] = None, return_state: bool = False
    ):
        conv_state, cell_state = state if state is not None else (None, None)
        gates, conv_state = self._gates(x, reset, conv_state)
        out = kernels.slstm_sequence(
            gates, self.R,
            forget_gate=self.cfg.slstm_forget_gate,
            initial_state=cell_state,
            return_final_state=return_state,
            doc_starts=reset,
        )
        h, cell_state = out if return_state else (out, None)
        y = self._out(x, h)
        return (y, (conv_state, cell_state)) if return_state else y

    def step(self, x: Tensor, state: Optional[Any]) -> tuple[Tensor, Any]:
        conv_state, cell_state = state if state is not None else (None, None)
        gates, conv_state = self._gates(x[:, None], None, conv_state)
        h, cell_state = kernels.slstm_step(gates[:, 0], self.R, cell_state, forget_gate=self.cfg.slstm_forget_gate)
        return self._out(x, h), (conv_state, cell_state)
