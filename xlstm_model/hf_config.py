"""The configuration half of the transformers xLSTM conversion (xlp.xlstm_model.hf has the weights):
config.json <-> ModelConfig, the architecture comparison `model.init_from` makes, and the model keys a
checkpoint decides. No torch here: the pipeline's config loader reads a checkpoint's config.json when it
resolves `model.init_from=hf:DIR`, on machines and in commands that never import torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from xlp.xlstm_model.config import ModelConfig

# transformers' xLSTM adds this eps to the mLSTM normaliser max(|n.q|, exp(-m)); ours adds none.
HF_KERNEL_EPS_EXPORT = 0.0
# transformers rounds q/k and v widths up to a multiple of 64 when it allocates the generation cache.
HF_CACHE_MULTIPLE = 64


class HFConversionError(ValueError):
    """The model (or checkpoint) uses an option the other side cannot express."""


def _round_up(x: float, m: int) -> int:  # transformers' round_up_to_next_multiple_of
    return int(((x + m - 1) // m) * m)


def _factor_for(dim: int, d: int) -> float:
    """A factor f with int(d * f) == dim (transformers truncates; ours rounds)."""
    f = dim / d
    for _ in range(4):
        if int(d * f) == dim:
            return f
        f = math.nextafter(f, math.inf)
    raise HFConversionError(f"cannot express width {dim} as int({d} * factor)")


# ----------------------------------------------------------------------------------------- export
def to_hf_config(cfg: ModelConfig, *, bos_id: int = 2, eos_id: int = 3, pad_id: int = 0,
                 weight_mode: str = "single") -> dict:
    """Our ModelConfig -> transformers xLSTMConfig fields (a JSON-able dict)."""
    cfg.validate()
    if cfg.arch != "xlstm_large":
        why = ("the NeurIPS xLSTM[a:b] stack (pre/post up-projection blocks, sLSTM) has no transformers class"
               if cfg.arch == "xlstm" else "the Llama baseline is not an xLSTM")
        raise HFConversionError(
            f"model.arch={cfg.arch!r}: --format hf writes transformers' xLSTM (xLSTM 7B layout), which only "
            f"arch 'xlstm_large' maps to; {why}. Use --format native (safetensors + our config + tokenizer)."
        )
    if cfg.vocab_size is None:
        raise HFConversionError("model.vocab_size is not set")
    if cfg.resolved_head_norm != "layer":
        raise HFConversionError(
            f"model.head_norm={cfg.resolved_head_norm!r}: transformers' xLSTM normalises each head with a "
            "LayerNorm (xLSTM 7B); a model trained with RMS head norms cannot be mapped onto it"
        )
    d = cfg.d_model
    for key, dim in (("qk_dim_factor", cfg.qk_dim), ("v_dim_factor", cfg.v_dim)):
        if dim % HF_CACHE_MULTIPLE:
            raise HFConversionError(
                f"model.{key}: width {dim} is not a multiple of {HF_CACHE_MULTIPLE}; transformers' xLSTM sizes "
                f"its generation cache as round_up(d_model * factor, {HF_CACHE_MULTIPLE}) and would not match"
            )
    caps = {}
    for ours, theirs, value in (("gate_soft_cap", "gate_soft_cap", cfg.resolved_gate_soft_cap),
                                ("logit_soft_cap", "output_logit_soft_cap", cfg.resolved_logit_soft_cap)):
        if value == 0:
            raise HFConversionError(
                f"model.{ours}=0 (off): transformers' xLSTM config takes a float cap and always applies it; "
                "an uncapped model cannot be expressed")
        caps[theirs] = float(value)
    ffn_factor = cfg.ffn_dim / d
    if _round_up(d * ffn_factor, cfg.ffn_multiple_of) != cfg.ffn_dim:
        raise HFConversionError(f"model.ffn_factor: FFN width {cfg.ffn_dim} is not reproducible by transformers' rounding")
    if weight_mode != "single":
        # transformers 5.x cannot even build a fused xLSTM (its _init_weights slices the fused gate bias
        # wrongly), so exports use the separate q/k/v/o/i/f matrices of the xLSTM 7B checkpoints.
        raise HFConversionError(f"weight_mode {weight_mode!r}: export writes 'single' only (fused checkpoints import)")
    return {
        "architectures": ["xLSTMForCausalLM"],
        "model_type": "xlstm",
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": d,
        "embedding_dim": d,
        "num_hidden_layers": cfg.num_blocks,
        "num_blocks": cfg.num_blocks,
        "num_heads": cfg.num_heads,
        "use_bias": False,
        "add_out_norm": True,
        "norm_reduction_force_float32": True,
        "norm_eps": float(cfg.norm_eps),
        "eps": HF_KERNEL_EPS_EXPORT,
        "qk_dim_factor": _factor_for(cfg.qk_dim, d),
        "v_dim_factor": _factor_for(cfg.v_dim, d),
        "ffn_proj_factor": ffn_factor,
        "ffn_round_up_to_multiple_of": cfg.ffn_multiple_of,
        **caps,
        "tie_word_embeddings": bool(cfg.tie_weights),
        "weight_mode": weight_mode,
        "chunk_size": cfg.mlstm_chunk_size,
        "mode": "inference",
        "return_last_states": True,
        "inference_state_dtype": "float32",
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def from_hf_config(hf: dict, base: Optional[ModelConfig] = None) -> ModelConfig:
    """transformers xLSTMConfig fields -> our ModelConfig (arch xlstm_large). Fields of `base` that the
    HF config does not determine (init, activation checkpointing, ...) are kept."""
    if hf.get("model_type") != "xlstm":
        raise HFConversionError(f"model_type {hf.get('model_type')!r}: only transformers' 'xlstm' converts")
    if hf.get("use_bias", False):
        raise HFConversionError("use_bias=true: our xlstm_large has no biases in q/k/v/o, out, FFN and norms")
    d = int(hf.get("hidden_size") or hf.get("embedding_dim"))
    nb = int(hf.get("num_hidden_layers") or hf.get("num_blocks"))
    if hf.get("embedding_dim") not in (None, d):
        raise HFConversionError(f"embedding_dim={hf['embedding_dim']} differs from hidden_size={d}")
    nh = int(hf.get("num_heads", 8))
    qk = int(d * float(hf.get("qk_dim_factor", 0.5)))
    v = int(d * float(hf.get("v_dim_factor", 1.0)))
    mult = int(hf.get("ffn_round_up_to_multiple_of", 64))
    ffn = _round_up(d * float(hf.get("ffn_proj_factor", 2.667)), mult)
    caps = {}
    for ours, theirs, default in (("gate_soft_cap", "gate_soft_cap", 15.0),
                                  ("logit_soft_cap", "output_logit_soft_cap", 30.0)):
        val = hf.get(theirs, default)
        caps[ours] = 0.0 if val is None else float(val)
    eps = float(hf.get("eps", 1e-6))
    if eps > 1e-5:
        raise HFConversionError(f"eps={eps}: our mLSTM normaliser has no eps term; only eps <= 1e-5 is accepted")
    if eps:
        warnings.warn(f"transformers' xLSTM adds eps={eps} to the mLSTM normaliser; ours adds none "
                      "(outputs differ by about that relative amount where the normaliser is ~1)")
    base_fields = dataclasses.asdict(base) if base is not None else {}
    keep = {k: base_fields[k] for k in ("init", "activation_checkpointing", "checkpoint_policy", "init_from")
            if k in base_fields}
    cfg = ModelConfig(
        arch="xlstm_large",
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        num_blocks=nb,
        num_heads=nh,
        slstm_at=[],
        tie_weights=bool(hf.get("tie_word_embeddings", False)),
        qk_dim_factor=qk / d,
        v_dim_factor=v / d,
        ffn_factor=ffn / d,
        ffn_multiple_of=mult,
        norm_eps=float(hf.get("norm_eps", 1e-6)),
        mlstm_chunk_size=int(hf.get("chunk_size", 64)),
        head_norm="layer",
        **caps,
        **keep,
    )
    cfg.validate()
    for name, ours, theirs in (("qk_dim_factor", cfg.qk_dim, qk), ("v_dim_factor", cfg.v_dim, v),
                               ("ffn_factor", cfg.ffn_dim, ffn)):
        if ours != theirs:
            raise HFConversionError(f"{name}: our width {ours} != transformers' {theirs}")
    return cfg


INIT_FROM_SCHEMES = ("hf", "native")
# Fields that change the network's function; these must agree between a checkpoint and the run.
_FUNCTIONAL = ("arch", "vocab_size", "d_model", "num_blocks", "num_heads", "slstm_at", "tie_weights",
               "mlstm_proj_factor", "conv_kernel", "qkv_blocksize", "slstm_num_heads", "slstm_forget_gate",
               "slstm_ffn_factor", "rope_theta")


def _functional_diff(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    xlstm_only = ("mlstm_proj_factor", "conv_kernel", "qkv_blocksize", "slstm_num_heads", "slstm_forget_gate",
                  "slstm_ffn_factor")
    diffs = []
    for key in _FUNCTIONAL:
        if key == "vocab_size" or (key in xlstm_only and ours.arch != "xlstm") or (key == "rope_theta" and ours.arch != "llama"):
            continue
        a, b = getattr(ours, key), getattr(theirs, key)
        if a != b:
            diffs.append(f"model.{key}={b!r} (run has {a!r})")
    derived = [("qk dim", "qk_dim"), ("v dim", "v_dim"), ("ffn dim", "ffn_dim"),
               ("gate soft cap", "resolved_gate_soft_cap"), ("logit soft cap", "resolved_logit_soft_cap"),
               ("head norm", "resolved_head_norm")] if ours.arch == "xlstm_large" else []
    for label, attr in derived:
        a, b = getattr(ours, attr), getattr(theirs, attr)
        if a != b:
            diffs.append(f"{label} {b!r} (run has {a!r})")
    if not math.isclose(ours.norm_eps, theirs.norm_eps, rel_tol=1e-6):
        diffs.append(f"model.norm_eps={theirs.norm_eps!r} (run has {ours.norm_eps!r})")
    return diffs


def check_same_architecture(ours: ModelConfig, theirs: ModelConfig, spec: str) -> None:
    """ValueError listing every difference between the run's model (`ours`) and the checkpoint's."""
    diffs = _functional_diff(ours, theirs)
    if theirs.vocab_size != ours.vocab_size:
        diffs.append(f"vocab size {theirs.vocab_size} (run has {ours.vocab_size}: the run's tokenizer must be "
                     "the checkpoint's)")
    if diffs:
        raise ValueError(f"model.init_from={spec}: the checkpoint's architecture differs from the run's: "
                         + "; ".join(diffs))


def parse_init_from(spec: str) -> tuple[str, str]:
    scheme, sep, path = spec.partition(":")
    if not sep or scheme not in INIT_FROM_SCHEMES or not path:
        raise ValueError(f"expected 'hf:PATH' (a transformers xLSTM checkpoint directory) or 'native:PATH' "
                         f"(a model directory we saved), got {spec!r}")
    return scheme, path


# The model.* keys a transformers checkpoint's config.json decides under `model.init_from=hf:DIR`: the
# run's model section takes them from the checkpoint. The rest (init, activation checkpointing, the
# kernel's chunk size) are the run's: they change how it trains, not the function it starts from.
CHECKPOINT_KEYS = ("arch", "vocab_size", "d_model", "num_blocks", "num_heads", "slstm_at", "tie_weights",
                   "qk_dim_factor", "v_dim_factor", "ffn_factor", "ffn_multiple_of", "norm_eps", "head_norm",
                   "gate_soft_cap", "logit_soft_cap")


def read_hf_config(directory: Union[str, Path]) -> dict:
    """DIR/config.json of a transformers checkpoint directory, as a dict; HFConversionError naming the
    file when it is missing or not JSON."""
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.is_file():
        raise HFConversionError(f"{directory}: no config.json (not a transformers checkpoint directory)")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise HFConversionError(f"{cfg_file}: cannot read it as JSON ({e})") from None


def checkpoint_model_keys(directory: Union[str, Path]) -> dict[str, Any]:
    """The model.* keys (CHECKPOINT_KEYS) of the transformers xLSTM checkpoint in `directory`, from its
    config.json: architecture, sizes, vocabulary, untied head, soft caps."""
    cfg = from_hf_config(read_hf_config(directory))
    return {key: getattr(cfg, key) for key in CHECKPOINT_KEYS}


def disagreements(checkpoint: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The model.* values in `given` (the command line's) that change the network the checkpoint's keys
    describe, each as 'model.KEY=GIVEN (the checkpoint's config.json: VALUE)'. A value that spells the
    same network another way (a factor giving the same width) is not one."""
    ck = ModelConfig(**checkpoint)
    out = []
    for key, value in given.items():
        try:
            alt = dataclasses.replace(ck, **{key: value}).validate()
            differs = bool(_functional_diff(ck, alt)) or (key == "vocab_size" and alt.vocab_size != ck.vocab_size)
        except (TypeError, ValueError):
            differs = True
        if differs:
            out.append(f"model.{key}={value!r} (the checkpoint's config.json: {checkpoint[key]!r})")
    return out
