"""Conversion between our xlstm_large LanguageModel and the Hugging Face transformers xLSTM format
(`model_type: xlstm`, `xLSTMForCausalLM`, the xLSTM 7B layout).

Pure tensor renaming plus config translation: nothing here imports transformers, so the extra stays
optional. Both directions check every config option that changes the network's function and refuse,
naming the option, where the two implementations cannot compute the same thing.

Mapping (ours -> transformers, weight_mode "single"; "fused" keeps our fused matrices):
  embedding.weight                 -> backbone.embeddings.weight
  blocks.i.norm.weight             -> backbone.blocks.i.norm_mlstm.weight
  blocks.i.qkvo.weight [q|k|v|o]   -> backbone.blocks.i.mlstm_layer.{q,k,v,ogate_preact}.weight
  blocks.i.if_gates.{weight,bias} [i|f] -> backbone.blocks.i.mlstm_layer.{igate,fgate}_preact.{weight,bias}
  blocks.i.head_norm.weight        -> backbone.blocks.i.mlstm_layer.multihead_norm.weight
  blocks.i.out.weight              -> backbone.blocks.i.mlstm_layer.out_proj.weight
  blocks.i.ffn_norm.weight         -> backbone.blocks.i.norm_ffn.weight
  blocks.i.ffn.gate_up.weight [g|u]-> backbone.blocks.i.ffn.{proj_up_gate,proj_up}.weight
  blocks.i.ffn.down.weight         -> backbone.blocks.i.ffn.proj_down.weight
  norm.weight                      -> backbone.out_norm.weight
  head.weight                      -> lm_head.weight
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.io import WEIGHTS, load_config
from xlp.xlstm_model.lm import build_model

PathLike = Union[str, os.PathLike]
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


def to_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig, weight_mode: str = "single") -> dict[str, Tensor]:
    """Our state dict (LanguageModel.state_dict()) -> transformers xLSTMForCausalLM names. Every tensor is
    a fresh contiguous copy (safetensors refuses shared storage)."""
    nh, qk, v, ffn = cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.ffn_dim
    out: dict[str, Tensor] = {}

    def put(name: str, t: Tensor) -> None:
        out[name] = t.detach().clone().contiguous()

    put("backbone.embeddings.weight", state["embedding.weight"])
    put("backbone.out_norm.weight", state["norm.weight"])
    put("lm_head.weight", state["head.weight"] if "head.weight" in state else state["embedding.weight"])
    for i in range(cfg.num_blocks):
        s, t = f"blocks.{i}.", f"backbone.blocks.{i}."
        put(t + "norm_mlstm.weight", state[s + "norm.weight"])
        put(t + "norm_ffn.weight", state[s + "ffn_norm.weight"])
        put(t + "mlstm_layer.multihead_norm.weight", state[s + "head_norm.weight"])
        put(t + "mlstm_layer.out_proj.weight", state[s + "out.weight"])
        put(t + "ffn.proj_down.weight", state[s + "ffn.down.weight"])
        if weight_mode == "fused":
            put(t + "mlstm_layer.qkv_opreact.weight", state[s + "qkvo.weight"])
            put(t + "mlstm_layer.ifgate_preact.weight", state[s + "if_gates.weight"])
            put(t + "mlstm_layer.ifgate_preact.bias", state[s + "if_gates.bias"])
            put(t + "ffn.proj_up_gate_z.weight", state[s + "ffn.gate_up.weight"])
            continue
        wq, wk, wv, wo = state[s + "qkvo.weight"].split([qk, qk, v, v], dim=0)
        for name, w in (("q", wq), ("k", wk), ("v", wv), ("ogate_preact", wo)):
            put(t + f"mlstm_layer.{name}.weight", w)
        gw, gb = state[s + "if_gates.weight"], state[s + "if_gates.bias"]
        put(t + "mlstm_layer.igate_preact.weight", gw[:nh])
        put(t + "mlstm_layer.igate_preact.bias", gb[:nh])
        put(t + "mlstm_layer.fgate_preact.weight", gw[nh:])
        put(t + "mlstm_layer.fgate_preact.bias", gb[nh:])
        g, u = state[s + "ffn.gate_up.weight"].split([ffn, ffn], dim=0)
        put(t + "ffn.proj_up_gate.weight", g)
        put(t + "ffn.proj_up.weight", u)
    return out


def save_hf(model: torch.nn.Module, cfg: ModelConfig, directory: PathLike, *, weight_mode: str = "single",
            bos_id: int = 2, eos_id: int = 3, pad_id: int = 0, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `directory/config.json` + `directory/model.safetensors` in transformers' xLSTM format."""
    from safetensors.torch import save_file

    hf_cfg = to_hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, weight_mode=weight_mode)
    state = to_hf_state_dict(model.state_dict(), cfg, weight_mode)
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.cpu() for k, t in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------------------- import
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


def from_hf_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers xLSTMForCausalLM names (either weight_mode) -> our state dict names."""
    out: dict[str, Tensor] = {}
    hs = dict(hf_state)
    if not any(k.startswith("backbone.") for k in hs):  # an xLSTMModel checkpoint (no LM head prefix)
        hs = {("backbone." + k if not k.startswith("lm_head.") else k): t for k, t in hs.items()}

    def take(name: str) -> Tensor:
        if name not in hs:
            raise HFConversionError(f"checkpoint lacks weight {name!r}")
        return hs.pop(name)

    out["embedding.weight"] = take("backbone.embeddings.weight")
    out["norm.weight"] = take("backbone.out_norm.weight")
    if "lm_head.weight" in hs:
        head = take("lm_head.weight")
        if cfg.tie_weights and not torch.equal(head, out["embedding.weight"]):
            raise HFConversionError("tie_word_embeddings=true but lm_head.weight differs from the embeddings")
        out["head.weight"] = head
    elif cfg.tie_weights:
        out["head.weight"] = out["embedding.weight"]
    else:
        raise HFConversionError("checkpoint lacks lm_head.weight and does not tie it to the embeddings")
    for i in range(cfg.num_blocks):
        s, t = f"blocks.{i}.", f"backbone.blocks.{i}."
        out[s + "norm.weight"] = take(t + "norm_mlstm.weight")
        out[s + "ffn_norm.weight"] = take(t + "norm_ffn.weight")
        out[s + "head_norm.weight"] = take(t + "mlstm_layer.multihead_norm.weight")
        out[s + "out.weight"] = take(t + "mlstm_layer.out_proj.weight")
        out[s + "ffn.down.weight"] = take(t + "ffn.proj_down.weight")
        if t + "mlstm_layer.qkv_opreact.weight" in hs:  # fused
            out[s + "qkvo.weight"] = take(t + "mlstm_layer.qkv_opreact.weight")
            out[s + "if_gates.weight"] = take(t + "mlstm_layer.ifgate_preact.weight")
            out[s + "if_gates.bias"] = take(t + "mlstm_layer.ifgate_preact.bias")
            out[s + "ffn.gate_up.weight"] = take(t + "ffn.proj_up_gate_z.weight")
            continue
        out[s + "qkvo.weight"] = torch.cat([take(t + f"mlstm_layer.{n}.weight") for n in ("q", "k", "v", "ogate_preact")])
        out[s + "if_gates.weight"] = torch.cat([take(t + "mlstm_layer.igate_preact.weight"),
                                                take(t + "mlstm_layer.fgate_preact.weight")])
        out[s + "if_gates.bias"] = torch.cat([take(t + "mlstm_layer.igate_preact.bias"),
                                              take(t + "mlstm_layer.fgate_preact.bias")])
        out[s + "ffn.gate_up.weight"] = torch.cat([take(t + "ffn.proj_up_gate.weight"), take(t + "ffn.proj_up.weight")])
    if hs:
        raise HFConversionError(f"checkpoint has weights this conversion does not know: {sorted(hs)[:5]}")
    return out


def read_hf_checkpoint(directory: PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dict, all tensors) of a transformers checkpoint directory; single-file or sharded
    safetensors (model.safetensors.index.json)."""
    from safetensors.torch import load_file

    root = Path(directory)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise HFConversionError(f"{root}: no config.json (not a transformers checkpoint directory)")
    hf_cfg = json.loads(cfg_file.read_text())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFConversionError(f"{root}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints convert)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(root / f)))
    return hf_cfg, state


def load_hf_model(directory: PathLike, base: Optional[ModelConfig] = None, dtype: torch.dtype = torch.float32):
    """Build our LanguageModel from a transformers xLSTM checkpoint directory."""
    hf_cfg, hf_state = read_hf_checkpoint(directory)
    cfg = from_hf_config(hf_cfg, base)
    with torch.device("meta"):
        model = build_model(cfg)
    load_converted(model, from_hf_state_dict(hf_state, cfg), dtype=dtype)
    return model


def load_converted(model: torch.nn.Module, state: dict[str, Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """Assign converted weights (our names) into `model` (any device, also meta), keeping ties."""
    cfg = model.config
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
    meta = any(p.is_meta for p in model.parameters())
    if not meta:
        dev = next(model.parameters()).device
        state = {k: t.to(device=dev, dtype=model.state_dict()[k].dtype) for k, t in state.items()}
    if cfg.tie_weights:
        state = {k: t for k, t in state.items() if k != "head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=meta)
    if cfg.tie_weights:
        model.head.weight = model.embedding.weight
        missing = [k for k in missing if k != "head.weight"]
    if missing or unexpected:
        raise HFConversionError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------------- init_from
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


def parse_init_from(spec: str) -> tuple[str, str]:
    scheme, sep, path = spec.partition(":")
    if not sep or scheme not in INIT_FROM_SCHEMES or not path:
        raise ValueError(f"expected 'hf:PATH' (a transformers xLSTM checkpoint directory) or 'native:PATH' "
                         f"(a model directory we saved), got {spec!r}")
    return scheme, path


def init_from(model: torch.nn.Module, spec: str) -> ModelConfig:
    """Overwrite `model`'s weights with the checkpoint `spec` names ("hf:PATH" or "native:PATH"), after
    checking that its architecture equals the run's (an error lists every difference as the
    model.* overrides that would make them agree). Returns the checkpoint's config."""
    scheme, path = parse_init_from(spec)
    ours: ModelConfig = model.config
    if scheme == "hf":
        hf_cfg, hf_state = read_hf_checkpoint(path)
        theirs = from_hf_config(hf_cfg, ours)
        state = from_hf_state_dict(hf_state, theirs)
    else:
        from safetensors.torch import load_file

        theirs = load_config(path)
        state = load_file(str(Path(path) / WEIGHTS))
        if theirs.tie_weights and "head.weight" not in state:
            state["head.weight"] = state["embedding.weight"]
    diffs = _functional_diff(ours, theirs)
    if theirs.vocab_size != ours.vocab_size:
        diffs.append(f"vocab size {theirs.vocab_size} (run has {ours.vocab_size}: the run's tokenizer must be "
                     "the checkpoint's)")
    if diffs:
        raise ValueError(f"model.init_from={spec}: the checkpoint's architecture differs from the run's: "
                         + "; ".join(diffs))
    load_converted(model, state)
    return theirs
