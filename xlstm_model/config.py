"""Model configuration: one dataclass for every architecture the package builds.

The pipeline composes this dataclass into its config schema under the key `model`, so every field
here is a config key (`model.d_model=512` on the command line). Only types OmegaConf structured
configs support are used. Fields that belong to one architecture are ignored by the others.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional, Union

ARCHS = ("xlstm", "xlstm_large", "llama")
INITS = ("small_wang", "normal")
FORGET_GATES = ("sigmoid", "exp")
HEAD_NORMS = ("layer", "rms")
INIT_FROM_SCHEMES = ("hf", "native")
CHECKPOINT_POLICIES = ("full", "selective")


@dataclass
class ModelConfig:
    arch: str = "xlstm"  # xlstm (NeurIPS xLSTM[a:b]) | xlstm_large (7B style) | llama (baseline)
    # None: the tokenizer's vocabulary, rounded up to a multiple of 64 (the pipeline fills it in).
    vocab_size: Optional[int] = None
    d_model: int = 128
    num_blocks: int = 2
    num_heads: int = 4  # mLSTM heads (xlstm, xlstm_large) or attention heads (llama)
    slstm_at: list[int] = field(default_factory=list)  # block indices that are sLSTM (xlstm arch)
    tie_weights: bool = False
    # Recompute each block in the backward pass instead of keeping its activations (training only).
    activation_checkpointing: bool = False
    # What a checkpointed block keeps (model.activation_checkpointing=true): full (only its input;
    # everything is recomputed) | selective (also its matmul, attention and mLSTM kernel outputs;
    # only norms and elementwise ops are recomputed: less memory saved, little compute repeated).
    checkpoint_policy: str = "full"

    # --- xlstm (NeurIPS) mLSTM block: pre up-projection ---
    mlstm_proj_factor: float = 2.0  # inner dim = factor * d_model
    conv_kernel: int = 4  # causal depthwise conv (mLSTM and sLSTM blocks)
    qkv_blocksize: int = 4  # block-diagonal ("head-wise") q/k/v projections, block size
    # --- xlstm (NeurIPS) sLSTM block: post up-projection ---
    slstm_num_heads: int = 4
    slstm_forget_gate: str = "sigmoid"  # sigmoid | exp
    slstm_ffn_factor: float = 4.0 / 3.0  # gated FFN after the sLSTM

    # --- xlstm_large (xLSTM 7B) block ---
    qk_dim_factor: float = 0.5  # q/k dim = factor * d_model
    v_dim_factor: float = 1.0  # v dim = factor * d_model
    # Soft caps c * tanh(x / c). None: the architecture's default (xlstm_large: gates 15, logits 30;
    # others: off). 0 turns a cap off.
    gate_soft_cap: Optional[float] = None
    logit_soft_cap: Optional[float] = None
    # Per-head norm of the mLSTM output: layer | rms. None: layer (as xLSTM 7B and transformers' xLSTM).
    # Models saved before this key existed load as rms (xlp.xlstm_model.io keeps their function).
    head_norm: Optional[str] = None

    # --- FFNs (SwiGLU in xlstm_large and llama) ---
    ffn_factor: float = 8.0 / 3.0
    ffn_multiple_of: int = 64  # FFN hidden dims are rounded up to a multiple of this

    # --- llama ---
    rope_theta: float = 10000.0

    # --- shared ---
    norm_eps: float = 1e-5
    mlstm_chunk_size: int = 64  # chunk length of the chunkwise mLSTM kernel (training/prefill)
    # small_wang: small init sqrt(2/(5d)) (Nguyen & Salazar) for inputs, Wang init 2/(L sqrt(d)) for
    # the projections that write into the residual stream (xLSTM papers). normal: GPT-2 style 0.02.
    init: str = "small_wang"
    # Start from a checkpoint instead of the init recipe: "hf:PATH" (a transformers xLSTM checkpoint
    # directory) or "native:PATH" (a model directory we saved). Its architecture must equal this one.
    init_from: Optional[str] = None

    # ---------------------------------------------------------------------------------------------
    def sequence_parallel_error(self, ranks: int) -> Optional[str]:
        """Why this model cannot train with train.sequence_parallel=`ranks` (None: it can): the state
        passing exists for the mLSTM (and the NeurIPS block's causal conv) only."""
        if ranks <= 1:
            return None
        if self.arch == "llama":
            return (f"train.sequence_parallel={ranks}: model.arch 'llama' is not supported (sequence parallelism "
                    "passes the mLSTM's recurrent state between ranks; attention would need every earlier rank's "
                    "keys and values); use train.sequence_parallel=1, or arch xlstm/xlstm_large")
        if self.arch == "xlstm" and self.slstm_at:
            return (f"train.sequence_parallel={ranks}: the sLSTM blocks (model.slstm_at={list(self.slstm_at)}) are "
                    "a nonlinear recurrence with no parallel form (their state could only be passed rank to rank "
                    "in order, no faster than one rank); use model.slstm_at=[] or train.sequence_parallel=1")
        return None

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the bad key (`model.<key>`); returns self so calls can chain."""

        def bad(key: str, why: str) -> None:
            raise ValueError(f"model.{key}: {why}")

        if self.arch not in ARCHS:
            bad("arch", f"unknown architecture {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            bad("vocab_size", f"must be a positive integer or null, got {self.vocab_size}")
        for key in ("d_model", "num_blocks", "num_heads", "conv_kernel", "qkv_blocksize", "slstm_num_heads",
                    "ffn_multiple_of", "mlstm_chunk_size"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("mlstm_proj_factor", "slstm_ffn_factor", "qk_dim_factor", "v_dim_factor", "ffn_factor",
                    "norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("gate_soft_cap", "logit_soft_cap"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad(key, f"must be null (arch default), 0 (off) or > 0, got {getattr(self, key)}")
        if self.d_model % self.num_heads:
            bad("num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            bad("checkpoint_policy", f"must be one of {', '.join(CHECKPOINT_POLICIES)}, got {self.checkpoint_policy!r}")
        if self.init not in INITS:
            bad("init", f"unknown init recipe {self.init!r}; valid: {', '.join(INITS)}")
        if self.slstm_forget_gate not in FORGET_GATES:
            bad("slstm_forget_gate", f"must be one of {', '.join(FORGET_GATES)}, got {self.slstm_forget_gate!r}")
        if self.head_norm is not None and self.head_norm not in HEAD_NORMS:
            bad("head_norm", f"must be null or one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")
        if self.head_norm is not None and self.arch != "xlstm_large":
            bad("head_norm", f"applies to arch 'xlstm_large' only, not {self.arch!r}; use null")
        if self.init_from is not None:
            scheme, sep, path = str(self.init_from).partition(":")
            if not sep or scheme not in INIT_FROM_SCHEMES or not path:
                bad("init_from", "expected null, 'hf:PATH' (a transformers xLSTM checkpoint directory) or "
                    f"'native:PATH' (a model directory saved by this package), got {self.init_from!r}")
        slstm_at = list(self.slstm_at)
        if slstm_at and self.arch != "xlstm":
            bad("slstm_at", f"sLSTM blocks exist only in arch 'xlstm', not {self.arch!r}; use []")
        for idx in slstm_at:
            if not 0 <= idx < self.num_blocks:
                bad("slstm_at", f"block index {idx} out of range [0, {self.num_blocks})")
        if len(set(slstm_at)) != len(slstm_at):
            bad("slstm_at", f"duplicate block indices in {slstm_at}")

        if self.arch == "xlstm":
            inner = self.mlstm_inner_dim
            if inner % self.num_heads:
                bad("mlstm_proj_factor", f"inner dim {inner} is not divisible by num_heads={self.num_heads}")
            if inner % self.qkv_blocksize:
                bad("qkv_blocksize", f"inner dim {inner} is not divisible by qkv_blocksize={self.qkv_blocksize}")
            if slstm_at and self.d_model % self.slstm_num_heads:
                bad("slstm_num_heads", f"d_model={self.d_model} is not divisible by slstm_num_heads={self.slstm_num_heads}")
        elif self.arch == "xlstm_large":
            for key, dim in (("qk_dim_factor", self.qk_dim), ("v_dim_factor", self.v_dim)):
                if dim < self.num_heads or dim % self.num_heads:
                    bad(key, f"dim {dim} is not divisible by num_heads={self.num_heads}")
        elif self.arch == "llama":
            if (self.d_model // self.num_heads) % 2:
                bad("num_heads", f"head dim {self.d_model // self.num_heads} must be even for RoPE")
        return self

    # Derived sizes (properties, so they are not config keys).
    @property
    def mlstm_inner_dim(self) -> int:
        return round(self.mlstm_proj_factor * self.d_model)

    @property
    def qk_dim(self) -> int:
        return round(self.qk_dim_factor * self.d_model)

    @property
    def v_dim(self) -> int:
        return round(self.v_dim_factor * self.d_model)

    def round_up(self, x: float) -> int:
        m = self.ffn_multiple_of
        return int(-(-int(round(x)) // m) * m)

    @property
    def ffn_dim(self) -> int:
        return self.round_up(self.ffn_factor * self.d_model)

    @property
    def slstm_ffn_dim(self) -> int:
        return self.round_up(self.slstm_ffn_factor * self.d_model)

    @property
    def resolved_gate_soft_cap(self) -> float:
        if self.gate_soft_cap is None:
            return 15.0 if self.arch == "xlstm_large" else 0.0
        return float(self.gate_soft_cap)

    @property
    def resolved_head_norm(self) -> str:
        return self.head_norm or "layer"

    @property
    def resolved_logit_soft_cap(self) -> float:
        if self.logit_soft_cap is None:
            return 30.0 if self.arch == "xlstm_large" else 0.0
        return float(self.logit_soft_cap)


# ------------------------------------------------------------------------------- YAML without OmegaConf
def _scalar(text: str) -> Any:
    """One YAML scalar or flow list of a flat model file: null, true/false, int, float, [a, b], str."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item) for item in text[1:-1].split(",") if item.strip()]
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` as the ModelConfig field's type (ints for float fields, strings for str fields)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint
    if value is None:
        if base is hint and hint is not Any:
            raise ValueError(f"model.{key}: may not be null")
        return None
    origin = typing.get_origin(base) or base
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif origin is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            return int(value)
    elif origin is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif origin is str:
        return str(value)
    elif origin is list:
        items = value if isinstance(value, list) else _scalar(str(value))
        if isinstance(items, list):
            return [_typed(key, item, typing.get_args(base)[0]) for item in items]
    raise ValueError(f"model.{key}: {value!r} is not a valid {getattr(origin, '__name__', origin)}")


def model_config_from(values: dict[str, Any]) -> ModelConfig:
    """A validated ModelConfig from plain values (strings are converted to the fields' types); an
    unknown key raises ValueError naming it and the valid ones."""
    hints = typing.get_type_hints(ModelConfig)
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in values:
        if key not in hints:
            raise ValueError(f"model.{key}: unknown key; valid: {', '.join(known)}")
    return ModelConfig(**{k: _typed(k, v, hints[k]) for k, v in values.items()}).validate()


def load_model_yaml(name: Union[str, Path], overrides: Optional[list[str]] = None,
                    config_dir: Optional[Path] = None) -> ModelConfig:
    """configs/model/NAME.yaml (or a path to such a file) with `key=value` overrides, read without
    OmegaConf, so benchmarks run where only torch and triton are installed. The files are flat
    `key: value` maps (scalars and flow lists); anything nested is refused."""
    path = Path(name)
    if not path.is_file():
        path = (config_dir or Path(find_spec("xlp.configs").origin).parent / "model") / f"{name}.yaml"  # packaged sizes
    values: dict[str, Any] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        body = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not body.strip():
            continue
        key, sep, value = body.partition(":")
        if not sep or body[0].isspace() or not value.strip():
            raise ValueError(f"{path}:{n}: expected a flat 'key: value' line, got {line!r}")
        values[key.strip()] = _scalar(value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        values[key.strip().removeprefix("model.")] = _scalar(value)
    return model_config_from(values)


MATVECS = ("reduce", "gemm")


MIX_WARPS = (1, 2, 4, 8, 16, 32)


@dataclass
class DecodeConfig:
    """How the one-token step runs (the `decode` config section). None of these changes what a step
    computes beyond rounding; they change how fast."""

    cuda_graph: bool = True  # CUDA: capture the step in a CUDA graph (replayed without launch overhead)
    compile: bool = True  # CUDA: torch.compile the step (never on CPU unless asked for per call)
    compile_mode: Optional[str] = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs (None: default)
    matvec: str = "reduce"  # compiled step: matrix-vector products as inductor reductions (reduce) or cuBLAS (gemm)
    tune: bool = False  # compiled step: inductor's coordinate-descent tuning of each kernel's launch parameters
    fused: bool = False  # xlstm_large: the hand-fused Triton step instead of the compiled one (other archs: ignored)
    pdl: bool = False  # fused step: programmatic dependent launch on Hopper and later
    mix: str = "auto"  # fused step: mlstm_decode_mix's (state tile, warps), 'TILExWARPS' e.g. 32768x8; auto: timed

    def validate(self) -> None:
        if self.matvec not in MATVECS:
            raise ValueError(f"config key `decode.matvec` is {self.matvec!r}; valid values: {', '.join(MATVECS)}")
        if self.tune and self.compile_mode:
            raise ValueError("decode.tune=true and decode.compile_mode cannot be combined (torch.compile takes a "
                             "mode or options, not both)")
        self.mix_launch()

    def mix_launch(self) -> Optional[tuple[int, int]]:
        """decode.mix as (TILE, WARPS), None for auto; ValueError naming the key for a bad value."""
        value = str(self.mix).strip().lower()
        if value == "auto":
            return None
        try:
            tile, warps = (int(v) for v in value.split("x"))
        except ValueError:
            tile = warps = 0
        if tile < 1 or tile & (tile - 1) or warps not in MIX_WARPS:
            raise ValueError(f"decode.mix={self.mix!r}: expected 'auto' or 'TILExWARPS' with TILE a power of two "
                             f"(C elements per state tile) and WARPS one of {', '.join(map(str, MIX_WARPS))}")
        return tile, warps

    def compile_options(self) -> tuple[Optional[str], bool, bool]:
        """(torch.compile mode, matvec-as-reduction, coordinate-descent tuning), checked."""
        self.validate()
        return self.compile_mode or None, self.matvec == "reduce", bool(self.tune)
