"""Fast token-by-token decoding: the one-token step with its recurrent state preallocated, captured
in a CUDA graph on GPU.

xLSTM decoding is one `LanguageModel.step` per token on a state of fixed size, so every step runs the
same kernels on the same shapes: exactly what a CUDA graph replays without the per-kernel launch
overhead of Python. At batch 1 a step is hundreds of tiny kernels (norms, gates, the state update)
around matrix-vector products, so on CUDA the step is first compiled with `torch.compile` (inductor
fuses the elementwise work around the matmuls; the ops run through their pure-PyTorch reference so
that inductor sees them) and the compiled step is then captured in the graph. For xlstm_large a
hand-fused step (five Triton kernels per block: kernels.decode_linear / mlstm_decode_mix) is there
too, opt-in (`decode.fused=true`) until its GPU speed is measured. `StepDecoder` keeps the
token, the state and the logits in fixed buffers; a step copies the token in, replays the graph (or,
off CUDA, runs the same code eagerly) and the state is updated in place. Greedy decoding captures the
argmax in the same graph and feeds it back as the next input on the device, so the GPU can run
several steps ahead of the host that prints the tokens. Uncompiled and unfused (the
CPU default) the outputs are those of `model.step` exactly; compiled or fused, equal to rounding
(the tests check both).

Architectures whose state grows (the Llama baseline's KV cache) fall back to the plain eager step.

`DecodeConfig` holds the decoder's settings (the pipeline config's `decode` section, read by
`xlp generate`); the `use_*` arguments of StepDecoder and generate_stream override it per call.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from xlp import kernels
from xlp.xlstm_model.config import DecodeConfig
from xlp.xlstm_model.lm import LanguageModel, sample_tokens, until_eos

PREFILL_SEGMENT = 2048  # prompt tokens per forward pass (bounds the (B, S, V) logits of a long prompt)



def graphs_wanted(device: torch.device, use_graph: Optional[bool], config: Optional[DecodeConfig] = None) -> bool:
    """None (auto): decode.cuda_graph (default on), on CUDA only."""
    if use_graph is None:
        use_graph = (config or DecodeConfig()).cuda_graph
    return bool(use_graph) and device.type == "cuda"


def fused_wanted(model: LanguageModel, use_fused: Optional[bool], config: Optional[DecodeConfig] = None) -> bool:
    """None (auto): on when decode.fused and the model has a fused step (xlstm_large). Off by default
    until its GPU speed is measured (the compiled step is the measured default)."""
    if use_fused is None:  # the config asks for it where it applies; other models decode as before
        return (config or DecodeConfig()).fused and model.has_fused_step
    if use_fused and not model.has_fused_step:
        raise ValueError(f"no fused decode step for arch {model.config.arch!r} (only xlstm_large has one)")
    return bool(use_fused)


def compile_wanted(device: torch.device, use_compile: Optional[bool], config: Optional[DecodeConfig] = None) -> bool:
    """None (auto): decode.compile (default on) on CUDA; off on CPU, where eager is already bound by
    the matmuls and a compile costs more than a short generation saves."""
    if use_compile is None:
        return device.type == "cuda" and (config or DecodeConfig()).compile
    return bool(use_compile)


def has_static_state(model: LanguageModel) -> bool:
    """Whether the step's state has a fixed size (recurrent), so it can live in preallocated buffers;
    the Llama baseline's KV cache grows."""
    return model.config.arch != "llama"


def step_compiles(model: LanguageModel, device: torch.device, use_compile: Optional[bool],
                  use_fused: Optional[bool], config: Optional[DecodeConfig] = None) -> bool:
    """Whether a StepDecoder with these options compiles the step (a one-off cost before the first
    decoded token)."""
    return (has_static_state(model) and not fused_wanted(model, use_fused, config)
            and compile_wanted(device, use_compile, config))


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


class MatvecAsReduction(TorchFunctionMode):
    """F.linear as multiply-and-sum, so that inductor writes the matrix-vector products of a batch-1
    step as reduction kernels and fuses the surrounding elementwise work into them, instead of
    calling a cuBLAS GEMM (a kernel of its own) for each. Used only while compiling the step."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)
            return y if bias is None else y + bias
        return func(*args, **kwargs)


def decode_compile_options(config: Optional[DecodeConfig] = None) -> tuple[Optional[str], bool, bool]:
    """(torch.compile mode, matvec-as-reduction, coordinate-descent tuning) from decode.compile_mode
    (default: inductor's default mode), decode.matvec (reduce or gemm, default reduce) and decode.tune
    (inductor's coordinate-descent tuning of each generated kernel's launch parameters; default off)."""
    return (config or DecodeConfig()).compile_options()


def step_in_place(model: LanguageModel, token: Tensor, state: Any) -> Tensor:
    """`model.step`, writing the new state into the tensors of `state`; returns the logits."""
    logits, new_state = model.step(token, state)
    for buf, t in zip(tree_flatten(state)[0], tree_flatten(new_state)[0]):
        buf.copy_(t)
    return logits


_compiled_steps: dict[tuple, Callable] = {}


def compiled_step_in_place(config: Optional[DecodeConfig] = None) -> Callable:
    """`step_in_place` under torch.compile with the config's compile options, made once per process
    and options: the state buffers are arguments, so decoders for the same model and batch size share
    one compiled graph."""
    key = decode_compile_options(config)
    if key not in _compiled_steps:
        mode, as_reduction, tune = key
        options = {"coordinate_descent_tuning": True} if tune else None
        compiled = torch.compile(step_in_place, fullgraph=True, dynamic=False, mode=mode, options=options)
        if as_reduction:
            def compiled_with_reductions(*args):
                with MatvecAsReduction():
                    return compiled(*args)
            _compiled_steps[key] = compiled_with_reductions
        else:
            _compiled_steps[key] = compiled
    return _compiled_steps[key]


def greedy_token(logits: Tensor) -> Tensor:
    """argmax over the vocabulary (B, V) -> (B,), the first maximum as torch.argmax: in two passes
    (block maxima, then the best block) where V allows, because a one-pass argmax of a single 50k
    row runs as one thread block on GPU."""
    B, V = logits.shape
    block = 256
    while block > 1 and V % block:
        block //= 2
    if block < 32 or V // block < 2:
        return logits.argmax(-1)
    block_max, block_arg = logits.view(B, V // block, block).max(-1)  # first maximum in each block
    best = block_max.argmax(-1, keepdim=True)  # first block holding the maximum
    return (best * block + block_arg.gather(-1, best))[:, 0]


class StepDecoder:
    """One token per call on preallocated buffers; `step(token)` -> logits (B, V) (a view of a buffer
    that the next step overwrites); `step_greedy(token)` -> the next tokens (B,), chosen on the
    device in the same graph; `greedy_tokens` runs ahead of the host. Build it from the state after
    the prompt. On CUDA each of the two kinds of step is captured in a graph on first use; the kind
    named by `greedy` (a greedy decoder: step + argmax) is captured here, before the first token.
    Settings: `config` (a DecodeConfig, default its defaults), use_graph / use_compile / use_fused
    (None: as the config says)."""

    def __init__(self, model: LanguageModel, state: Any, batch_size: int, *, use_graph: Optional[bool] = None,
                 use_compile: Optional[bool] = None, use_fused: Optional[bool] = None, warmup: int = 2,
                 greedy: bool = False, config: Optional[DecodeConfig] = None):
        self.model = model
        self.config = config or DecodeConfig()
        self.config.validate()
        self.mix = self.config.mix_launch()
        self.compiled = self.fused = self.use_graph = False
        device = next(model.parameters()).device
        leaves, self._spec = tree_flatten(state)
        self.static = has_static_state(model) and all(isinstance(t, Tensor) for t in leaves) and bool(leaves)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.greedy_graph: Optional[torch.cuda.CUDAGraph] = None  # step + argmax
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._fed_back: Optional[Tensor] = None  # the last step_greedy result, already in self.token
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
        self.fused = fused_wanted(model, use_fused, self.config)  # hand-fused kernels: no compile needed
        self.compiled = not self.fused and compile_wanted(device, use_compile, self.config)
        self.use_graph = graphs_wanted(device, use_graph, self.config)
        self.warmup = warmup
        if self.use_graph and greedy:
            self.greedy_graph, _ = self._capture(self._run_greedy)
        elif self.use_graph:
            self.graph, self.logits = self._capture(self._run)

    def _run(self) -> Tensor:
        state = tree_unflatten(self.buffers, self._spec)
        if self.fused:
            return self.model.step_fused(self.token, state, pdl=self.config.pdl, mix=self.mix)
        if not self.compiled:
            return step_in_place(self.model, self.token, state)
        # Inductor fuses the reference ops; it would only see our Triton kernels as opaque calls.
        with kernels.use_backend("reference"):
            return compiled_step_in_place(self.config)(self.model, self.token, state)

    def _run_greedy(self) -> Tensor:
        """A step whose argmax becomes the next step's input on the device (no copy in, no launch)."""
        logits = self._run()
        self.token.copy_(greedy_token(logits))
        return logits

    def snapshot(self) -> Optional[list[Tensor]]:
        """Copies of the state and input token buffers, for `restore` (None: a growing state)."""
        return [b.clone() for b in self.buffers + [self.token]] if self.static else None

    def restore(self, snapshot: Optional[list[Tensor]]) -> None:
        """Put back the state and input token of a `snapshot`."""
        if snapshot is not None:
            for b, s in zip(self.buffers + [self.token], snapshot):
                b.copy_(s)
            self._fed_back = None

    def _capture(self, run) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Capture `run` -> (graph, its logits buffer), leaving state and token as they were."""
        saved = self.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile / autotune every kernel before capture
            for _ in range(max(self.warmup, 1)):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = run()
        self.restore(saved)  # warmup and capture advanced them: undo
        return graph, logits

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        if not self.static:
            logits, self.state = self.model.step(token, self.state)
            return logits
        self.token.copy_(token)
        self._fed_back = None
        if self.use_graph:
            if self.graph is None:
                self.graph, self.logits = self._capture(self._run)
            self.graph.replay()
            return self.logits
        return self._run()

    def _greedy_input(self, token: Tensor) -> None:
        """Make `token` the greedy graph's input (no copy when it is the result fed back), capturing
        that graph on first use."""
        if token is not self._fed_back:
            self.token.copy_(token)
        if self.greedy_graph is None:
            self.greedy_graph, _ = self._capture(self._run_greedy)

    @torch.no_grad()
    def step_greedy(self, token: Tensor) -> Tensor:
        """Greedy decoding: one step on `token` (B,), returns argmax of its logits (B,), a new tensor.
        Passing that result back in skips the copy: the graph has already made it the next input."""
        if not self.use_graph:
            return greedy_token(self.step(token))
        self._greedy_input(token)
        self.greedy_graph.replay()
        self._fed_back = self.token.clone()
        return self._fed_back

    @torch.no_grad()
    def greedy_tokens(self, token: Tensor, n: int, run_ahead: int = 4) -> Iterator[Tensor]:
        """n greedy tokens after `token` (B,), each yielded on the host as soon as it is there. With a
        CUDA graph the device runs up to `run_ahead` steps ahead of the host: each step's argmax is
        already the next step's input on the device, so reading a token back (or printing it) never
        holds up the next step. Stopping early leaves the state up to `run_ahead` steps further on."""
        if not self.use_graph:
            for _ in range(n):
                token = self.step_greedy(token)
                yield token.cpu()
            return
        self._greedy_input(token)
        self._fed_back = None
        # a ring of pinned host buffers: slot i is refilled only after its token was handed out
        ring = [torch.empty(self.token.shape, dtype=self.token.dtype, pin_memory=True) for _ in range(run_ahead + 1)]
        pending: deque = deque()

        def ready() -> Tensor:
            host, copied = pending.popleft()
            copied.synchronize()
            return host.clone()

        for i in range(n):
            self.greedy_graph.replay()
            host = ring[i % len(ring)]
            host.copy_(self.token, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            pending.append((host, copied))
            if len(pending) > run_ahead:
                yield ready()
        while pending:
            yield ready()


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
    use_compile: Optional[bool] = None,
    use_fused: Optional[bool] = None,
    config: Optional[DecodeConfig] = None,
) -> Iterator[Tensor]:
    """Yield the sampled tokens (B,) one step at a time (stops after max_new_tokens, or when every row
    has emitted `eos`). Same sampling as `LanguageModel.generate`. Greedy tokens (temperature <= 0)
    come on the host, the others on the model's device. The decoder's settings: `config` and the
    use_* overrides (see StepDecoder)."""
    model.eval()
    logits, state = prefill(model, ids)
    # Built (compiled, captured) before the first token is yielded, so the tokens after it come at the
    # decoder's pace; a one-token request needs none.
    decoder = None
    if max_new_tokens > 1:
        decoder = StepDecoder(model, state, ids.shape[0], use_graph=use_graph, use_compile=use_compile,
                              use_fused=use_fused, greedy=temperature <= 0, config=config)
    if decoder is not None and temperature <= 0:  # greedy: the argmax stays on the device, which runs ahead
        first = logits.argmax(-1)
        tokens = decoder.greedy_tokens(first, max_new_tokens - 1)
        yield from until_eos(itertools.chain([first.cpu()], tokens), eos)  # all on the host
        return
    yield from sample_tokens(logits, decoder.step if decoder else None, max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos=eos, generator=generator)
