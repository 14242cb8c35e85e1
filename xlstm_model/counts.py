"""Parameter counts and training FLOPs per token (for MFU)."""
from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn as nn

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.lm import as_model_config, build_model


def _meta_model(cfg: ModelConfig) -> nn.Module:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size: must be set to count parameters")
    with torch.device("meta"):  # shapes only: a 7B model costs no memory
        return build_model(cfg)


def count_params(model_or_cfg: Union[nn.Module, ModelConfig, Any], *, exclude_embedding: bool = False) -> int:
    """Number of parameters (tied weights counted once). With exclude_embedding, the input
    embedding table is left out (its lookup costs no FLOPs)."""
    model = model_or_cfg if isinstance(model_or_cfg, nn.Module) else _meta_model(as_model_config(model_or_cfg))
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        total -= model.embedding.weight.numel()
    return total


def flops_per_token(cfg: Union[ModelConfig, Any], seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) at sequence length seq_len.

    Forward counts 2 FLOPs per weight of every matmul-like parameter (all parameters with 2+ dims
    except the embedding table, so the LM head is counted even when tied) plus the sequence mixing:
    - attention (PaLM convention, no causal discount): 2 * 2 * seq_len * d per layer (QK^T, AV);
    - chunkwise mLSTM per head: 2 * L * (DQK + DV) inside the chunk (L = min(chunk, seq_len)),
      plus 2 * DQK * DV to read the carried state and 2 * DQK * DV to update it.
    Norms, gates' elementwise math and the sLSTM pointwise recurrence are ignored (< 1%).
    """
    cfg = as_model_config(cfg)
    model = _meta_model(cfg)
    dense = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                if p.dim() >= 2 and not name.startswith("embedding."))
    forward = 2.0 * dense
    for block in model.blocks:
        name = type(block).__name__
        if name == "LlamaBlock":
            forward += 2 * 2 * seq_len * cfg.d_model
        elif name in ("MLSTMBlock", "XLSTMLargeBlock"):
            if name == "MLSTMBlock":
                nh, dqk, dv = cfg.num_heads, cfg.mlstm_inner_dim // cfg.num_heads, cfg.mlstm_inner_dim // cfg.num_heads
            else:
                nh, dqk, dv = cfg.num_heads, cfg.qk_dim // cfg.num_heads, cfg.v_dim // cfg.num_heads
            chunk = min(cfg.mlstm_chunk_size, seq_len)
            forward += nh * (2 * chunk * (dqk + dv) + 4 * dqk * dv)
    return 3.0 * forward


class ActivationBytes:
    """Bytes a training forward pass keeps for its backward pass (the tensors autograd saves, each storage
    once, parameters left out), as a + b*S + c*B*S for a micro-batch of B rows of S tokens: measured on
    the real model at three short shapes ((1, P), (2, P), (1, 2P)) with the ops of the device it is
    built on, then extrapolated. A lower bound of a step's memory: the backward pass needs more
    (gradients, temporaries), and an op that grows faster than S (attention's S x S on some paths)
    is counted as linear."""

    def __init__(self, model: nn.Module, probe_len: int = 128):
        self.probe_len = P = int(probe_len)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a few hundred tiny ops: more threads only contend (10x slower on 2 busy cores)
        try:
            f11, f21, f12 = (self._measure(model, b, s) for b, s in ((1, P), (2, P), (1, 2 * P)))
        finally:
            torch.set_num_threads(threads)
        self.c = max(0.0, (f21 - f11) / P)
        self.b = max(0.0, (f12 - f11) / P - self.c)
        self.a = max(0.0, f11 - self.b * P - self.c * P)

    def __call__(self, batch: int, seq_len: int) -> float:
        return self.a + self.b * seq_len + self.c * batch * seq_len

    @staticmethod
    def _measure(model: nn.Module, batch: int, seq_len: int) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        device = next(model.parameters()).device
        x = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
        starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        starts[:, 0] = True
        was_training = model.training
        model.train()
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x, doc_starts=starts, targets=x)
        finally:
            model.train(was_training)
        return sum(seen.values())
