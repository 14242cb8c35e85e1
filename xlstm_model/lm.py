"""The language model shared by every architecture: embedding -> blocks -> final norm -> LM head.

One class for xLSTM[a:b], xLSTM-large and the Llama baseline, so the families share embedding,
head, loss, checkpointing and generation code and can be trained side by side on the same shards.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from xlp import kernels
from xlp.kernels.dispatch import preload_triton
from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.layers import LayerNorm, RMSNorm, soft_cap, std_in
from xlp.xlstm_model.llama import LlamaBlock
from xlp.xlstm_model.sequence_parallel import SeqParallel, keep_exchange_out_of_compile
from xlp.xlstm_model.xlstm import MLSTMBlock, SLSTMBlock
from xlp.xlstm_model.xlstm_large import XLSTMLargeBlock

State = list[Any]  # one entry per block: (conv state, cell state) for xLSTM blocks, the KV cache for Llama


def make_block(cfg: ModelConfig, index: int) -> nn.Module:
    if cfg.arch == "xlstm":
        return SLSTMBlock(cfg) if index in cfg.slstm_at else MLSTMBlock(cfg)
    if cfg.arch == "xlstm_large":
        return XLSTMLargeBlock(cfg)
    return LlamaBlock(cfg)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, init: bool = True):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size: must be set before building the model (the pipeline fills it from the tokenizer)")
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(make_block(cfg, idx) for idx in range(cfg.num_blocks))
        # The NeurIPS xLSTM uses LayerNorm throughout; xLSTM 7B and Llama use RMSNorm.
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.arch == "xlstm" else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        if init:  # False: the weights are about to come from a checkpoint (and may be partitioned already)
            self.init_weights()
        # How hidden_states runs a block: run_block itself, or its torch.compile'd form (compile_blocks).
        # A plain attribute, not a submodule: compiling changes no parameter name or state dict key.
        self._run_block: Callable[..., Tensor] = run_block

    def init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=std_in(self.config))
        if not self.config.tie_weights:
            nn.init.normal_(self.head.weight, std=std_in(self.config))
        for block in self.blocks:
            block.init_weights()

    # ----------------------------------------------------------------------------------- training
    def hidden_states(self, input_ids: Tensor, doc_starts: Optional[Tensor] = None) -> Tensor:
        """(B, S) token ids -> (B, S, D) final-normed hidden states."""
        B, S = input_ids.shape
        reset = kernels.doc_starts_mask(doc_starts, B, S, input_ids.device)
        x = self.embedding(input_ids)
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        policy = self.config.checkpoint_policy if use_ckpt else "none"
        for block in self.blocks:
            x = self._run_block(block, x, reset, policy)
        return self.norm(x)

    def compile_blocks(self, backend: str = "inductor", mode: Optional[str] = None) -> "LanguageModel":
        """Run every block through torch.compile (activation checkpointing included, so a selective
        policy is applied inside the compiled graph). The blocks share one compiled graph per input
        shape and policy: parameters are graph inputs, so 24 blocks cost one compile, not 24. Our
        Triton ops are custom ops with fake implementations: the graph calls them as they are. The
        embedding, final norm and fused linear + cross-entropy stay outside. Returns self."""
        preload_triton()
        keep_exchange_out_of_compile()  # sequence parallelism: its collectives run between the graphs
        self._run_block = torch.compile(run_block, backend=backend, mode=mode, dynamic=False)
        return self

    def set_sequence_parallel(self, sp: Optional[SeqParallel]) -> "LanguageModel":
        """Train on slices of each row (train.sequence_parallel): `forward` then takes this rank's
        tokens (xlp.xlstm_model.sequence_parallel) and every mLSTM layer passes the state over the
        group (collective). None: whole rows again. ValueError for the architectures that have no
        exact parallel form here (sLSTM blocks, the Llama baseline). Returns self."""
        error = self.config.sequence_parallel_error(sp.size if sp is not None else 1)
        if error:
            raise ValueError(error)
        for block in self.blocks:
            block.sp = sp if sp is not None and sp.size > 1 else None
        return self

    @property
    def sequence_parallel(self) -> Optional[SeqParallel]:
        return getattr(self.blocks[0], "sp", None) if len(self.blocks) else None

    @property
    def blocks_compiled(self) -> bool:
        return self._run_block is not run_block

    def logits(self, hidden: Tensor) -> Tensor:
        return soft_cap(self.head(hidden), self.config.resolved_logit_soft_cap)  # xLSTM 7B caps at 30

    def forward(
        self,
        input_ids: Tensor,
        *,
        doc_starts: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
    ) -> Tensor:
        """input_ids: (B, S) int64. doc_starts: bool (B, S), True where a new document begins (no
        state or attention crosses it), or cu_seqlens for B = 1. Returns logits (B, S, V) if targets
        is None, else the mean cross-entropy over targets != -100 (a scalar)."""
        hidden = self.hidden_states(input_ids, doc_starts)
        if targets is None:
            return self.logits(hidden)
        return kernels.linear_cross_entropy(
            hidden, self.head.weight, targets, ignore_index=-100, soft_cap=self.config.resolved_logit_soft_cap or None
        )

    # --------------------------------------------------------------------------------- recurrence
    def forward_with_state(self, input_ids: Tensor, state: Optional[State] = None, *,
                           last_only: bool = False) -> tuple[Tensor, State]:
        """Run (B, S) tokens continuing from `state` (None: fresh). Returns logits (B, S, V) and the
        state after the last token: recurrent states for xLSTM, the KV cache for Llama.
        last_only: logits of the last position only, (B, 1, V): what prefill needs before decoding,
        without a (B, S, V) tensor per chunk."""
        x = self.embedding(input_ids)
        state = state if state is not None else [None] * len(self.blocks)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block(x, None, block_state, return_state=True)
            new_state.append(block_state)
        if last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x)), new_state

    def step(self, token_ids: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """One token per row: token_ids (B,) -> logits (B, V), new state. Uses the step kernels."""
        x = self.embedding(token_ids)
        state = state if state is not None else [None] * len(self.blocks)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block.step(x, block_state)
            new_state.append(block_state)
        return self.logits(self.norm(x)), new_state

    @property
    def has_fused_step(self) -> bool:
        """Whether `step_fused` exists for this architecture (xLSTM-large blocks and an RMSNorm head)."""
        return all(hasattr(b, "step_fused") for b in self.blocks) and isinstance(self.norm, RMSNorm)

    def step_fused(self, token_ids: Tensor, state: State, *, pdl: bool = False,
                   mix: Optional[tuple[int, int]] = None) -> Tensor:
        """`step` through the fused decode kernels (kernels.decode_linear / mlstm_decode_mix), the
        state updated in place: token_ids (B,) -> logits (B, V). No autograd. pdl, mix: the kernels'
        launch options (no effect on the result)."""
        x = self.embedding(token_ids)
        for block, block_state in zip(self.blocks, state):
            x = block.step_fused(x, block_state, pdl=pdl, mix=mix)
        return kernels.decode_linear(x, self.head.weight, norm_weight=self.norm.weight, norm_eps=self.norm.eps,
                                     soft_cap=self.config.resolved_logit_soft_cap or 0.0, pdl=pdl)

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Continue the prompts ids (B, S) by up to max_new_tokens sampled tokens; returns (B, S + n).

        The prompt is read once (chunkwise / full attention), then one token at a time from the
        recurrent state, so xLSTM memory does not grow with the context (Llama keeps a KV cache).
        temperature 0 is greedy. Rows that emitted `eos` keep emitting it; stops when all have.
        """
        was_training = self.training
        self.eval()
        try:
            logits, state = self.forward_with_state(ids)

            def next_logits(token: Tensor) -> Tensor:
                nonlocal state
                step_logits, state = self.step(token, state)
                return step_logits

            tokens = sample_tokens(logits[:, -1], next_logits, max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, eos=eos, generator=generator)
            return torch.cat([ids] + [t[:, None] for t in tokens], dim=1)
        finally:
            self.train(was_training)


# ------------------------------------------------------------------------ activation checkpointing
# Ops whose outputs a selectively checkpointed block keeps: the matmuls and the sequence mixing (the
# costly part of a block's forward). Everything else (norms, gates, activations, residual adds) is
# recomputed in the backward: cheap elementwise work whose outputs are a large share of the memory.
SAVED_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "xlp_triton::mlstm_chunkwise_fwd", "xlp_triton::slstm_fwd",
}


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of SAVED_OPS, recompute the rest (torch.utils.checkpoint's SAC policy)."""
    name = op.name() if hasattr(op, "name") else str(op)
    return CheckpointPolicy.MUST_SAVE if name in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block: nn.Module, x: Tensor, reset: Optional[Tensor], policy: str = "none") -> Tensor:
    """One block's forward under an activation checkpointing policy: none (keep every activation),
    full (keep only x; recompute the block in the backward), selective (keep SAVED_OPS' outputs)."""
    if policy == "none":
        return block(x, reset)
    if policy == "full":
        return checkpoint(block, x, reset, use_reentrant=False)
    if policy == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, selective_policy)
        return checkpoint(block, x, reset, use_reentrant=False, context_fn=context)
    raise ValueError(f"unknown activation checkpointing policy {policy!r}")


def sample_tokens(
    logits: Tensor,
    next_logits: Optional[Callable[[Tensor], Tensor]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """The sampling loop every generator shares: from the prompt's last logits (B, V), sample a token
    (B,), yield it, and ask `next_logits(token)` for the next step's logits. Rows that emitted `eos`
    keep emitting it; stops after max_new_tokens or when every row has emitted `eos`. `next_logits`
    may be None when max_new_tokens <= 1 (it is never called)."""

    def tokens() -> Iterator[Tensor]:
        token = sample(logits, temperature, top_k, top_p, generator)
        for n in range(max_new_tokens):
            yield token
            if n < max_new_tokens - 1:  # asked for only when the caller wants another token
                token = sample(next_logits(token), temperature, top_k, top_p, generator)

    yield from until_eos(tokens(), eos)


def until_eos(tokens: Iterable[Tensor], eos: Optional[int]) -> Iterator[Tensor]:
    """Pass the tokens (B,) through; a row that emitted `eos` emits it from then on, and the stream
    ends once every row has (the source is not asked for another token). A done row's
    later tokens never reach its output, and rows do not interact, so what the source feeds the
    model for it does not matter."""
    done: Optional[Tensor] = None
    for token in tokens:
        if eos is not None:
            done = torch.zeros_like(token, dtype=torch.bool) if done is None else done
            token = torch.where(done, torch.full_like(token, eos), token)
            done = done | (token == eos)
        yield token
        if done is not None and bool(done.all()):
            return


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Sample one token per row from logits (B, V): temperature, then top-k, then nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop = torch.cumsum(probs, dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def build_model(cfg: Union[ModelConfig, Any], *, init: bool = True) -> LanguageModel:
    """Build the model a config describes (ModelConfig, an OmegaConf node, or a dict).
    cfg.vocab_size must be set. Weights are initialised by the papers' recipes; init=False leaves
    PyTorch's default initialisation, for weights a checkpoint is about to overwrite."""
    return LanguageModel(as_model_config(cfg), init=init)


def as_model_config(cfg: Union[ModelConfig, Any]) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    # the model runs where only torch (and triton) are installed: omegaconf only for the pipeline's configs
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        if isinstance(obj, ModelConfig):
            return obj
        cfg = obj
    if isinstance(cfg, dict):
        known = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model.{unknown[0]}: unknown key; valid: {', '.join(sorted(known))}")
        return ModelConfig(**cfg)
    raise TypeError(f"expected a ModelConfig, DictConfig or dict, got {type(cfg).__name__}")
