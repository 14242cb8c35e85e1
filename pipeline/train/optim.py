"""AdamW with parameter groups, and a gate that lets the loop skip an optimizer step.

No weight decay on norms, biases, gate biases (every tensor with fewer than two dimensions) and on
embeddings (the weights of nn.Embedding modules, tied output heads included).
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: `decay` (matrices) and `no_decay` (norms, biases, gates, embeddings)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # a parameter ZeRO-3 partitioned when it was built (zero.Init) keeps its shape in ds_shape
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        if ndim < 2 or id(p) in embedding_params or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


class StepGate:
    """Wraps an optimizer's `step` so that the loop can veto it (non-finite loss or gradients).

    DeepSpeed's ZeRO 1-3 optimizers skip a step themselves when the gradient norm is not finite;
    ZeRO-0 calls the torch optimizer directly, and nothing checks the loss: the gate covers both.
    With the inner step vetoed, parameters and optimizer state (moments, step count) stay as they were.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.closed = False
        self.vetoed = 0  # inner step calls vetoed during the current closed period
        inner = optimizer.step

        @functools.wraps(inner)
        def step(*args, **kwargs):
            if self.closed:
                self.vetoed += 1
                return None
            return inner(*args, **kwargs)

        optimizer.step = step  # instance attribute: shadows the class's (hook-patched) step

    def close(self) -> None:
        self.closed, self.vetoed = True, 0

    def open(self) -> None:
        self.closed = False


def build_optimizer(model: nn.Module, tc, *, cpu_adam: bool = False, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; DeepSpeed's CPU Adam (a JIT-built op) for optimizer offload on GPUs.
    fused: torch's fused AdamW (one kernel for every parameter's update instead of a few per tensor
    group); the same update up to rounding."""
    groups = param_groups(model, tc.weight_decay)
    betas = tuple(float(b) for b in tc.betas)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay,
                             fused=True if fused else None)
