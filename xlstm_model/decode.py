"""Fast token-by-token decoding: the one-token step with its recurrent state preallocated, captured
in a CUDA graph on GPU.

xLSTM decoding is one `LanguageModel.step` per token on a state of fixed size, so every step runs the
same kernels on the same shapes: exactly what a CUDA graph replays without the per-kernel launch
overhead of Python (hundreds of small kernels per token at batch 1). `StepDecoder` keeps the token,
the state and the logits in fixed buffers; a step copies the token in, replays the graph (or, off
CUDA, runs the same code eagerly) and the state is updated in place. On CPU, or with graphs off, the
outputs are those of `model.step` exactly (the tests check this).

Architectures whose state grows (the Llama baseline's KV cache) fall back to the plain eager step.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from xlstm_model.lm import LanguageModel, sample_tokens

PREFILL_SEGMENT = 2048  # prompt tokens per forward pass (bounds the (B, S, V) logits of a long prompt)


def graphs_wanted(device: torch.device, use_graph: Optional[bool]) -> bool:
    """None (auto): on for CUDA unless XLP_CUDA_GRAPH=0."""
    if use_graph is None:
        use_graph = os.environ.get("XLP_CUDA_GRAPH", "1") != "0"
    return bool(use_graph) and device.type == "cuda"


@torch.no_grad()
def prefill(model: LanguageModel, ids: Tensor, segment: int = PREFILL_SEGMENT) -> tuple[Tensor, Any]:
    """Read the prompt (B, S) in segments, carrying the state; returns the last position's logits (B, V)
    and the state after it."""
    state = None
    logits = None
    for start in range(0, ids.shape[1], segment):
        out, state = model.forward_with_state(ids[:, start:start + segment], state)
        logits = out[:, -1]
        del out
    return logits, state


class StepDecoder:
    """One token per call on preallocated buffers; `step(token)` -> logits (B, V) (a view of a buffer
    that the next step overwrites). Build it from the state after the prompt."""

    def __init__(self, model: LanguageModel, state: Any, batch_size: int, *, use_graph: Optional[bool] = None,
                 warmup: int = 2):
        self.model = model
        device = next(model.parameters()).device
        leaves, self._spec = tree_flatten(state)
        self.static = model.config.arch != "llama" and all(isinstance(t, Tensor) for t in leaves) and bool(leaves)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        if not self.static:  # growing state (KV cache): plain eager steps
            self.state = state
            return
        self.buffers = [t.detach().clone(memory_format=torch.contiguous_format) for t in leaves]
        # One eager step on a copy checks that the step's state has the prefill state's layout.
        _, probe = model.step(self.token, tree_unflatten([b.clone() for b in self.buffers], self._spec))
        probe_leaves, probe_spec = tree_flatten(probe)
        if probe_spec != self._spec or any(a.shape != b.shape for a, b in zip(probe_leaves, self.buffers)):
            self.static, self.state = False, state
            return
        # keep the step's dtypes (e.g. fp32 cell states), so a replay never changes a buffer's type
        self.buffers = [b.to(p.dtype) for b, p in zip(self.buffers, probe_leaves)]
        self.logits: Optional[Tensor] = None
        if graphs_wanted(device, use_graph):
            self._capture(warmup)

    def _body(self) -> Tensor:
        logits, new_state = self.model.step(self.token, tree_unflatten(self.buffers, self._spec))
        for buf, t in zip(self.buffers, tree_flatten(new_state)[0]):
            buf.copy_(t)
        return logits

    def _capture(self, warmup: int) -> None:
        saved = [b.clone() for b in self.buffers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile / autotune every kernel before capture
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._body()
        for b, s in zip(self.buffers, saved):  # warmup and capture advanced the state: undo
            b.copy_(s)
        self.graph = graph

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        if not self.static:
            logits, self.state = self.model.step(token, self.state)
            return logits
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._body()


@torch.no_grad()
def generate_stream(
    model: LanguageModel,
    ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_graph: Optional[bool] = None,
) -> Iterator[Tensor]:
    """Yield the sampled tokens (B,) one step at a time (stops after max_new_tokens, or when every row
    has emitted `eos`). Same sampling as `LanguageModel.generate`."""
    model.eval()
    logits, state = prefill(model, ids)
    decoder = None

    def next_logits(token: Tensor) -> Tensor:
        nonlocal decoder
        if decoder is None:  # built on the first step only: a one-token request needs none
            decoder = StepDecoder(model, state, ids.shape[0], use_graph=use_graph)
        return decoder.step(token)

    yield from sample_tokens(logits, next_logits, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos=eos, generator=generator)
