"""Conversion between our xlstm_large LanguageModel and the Hugging Face transformers xLSTM format
(`model_type: xlstm`, `xLSTMForCausalLM`, the xLSTM 7B layout).

Pure tensor renaming plus config translation (the config half, torch-free, in hf_config.py): nothing here
imports transformers, so the extra stays optional. CheckpointReader reads any flat range of any converted
tensor without loading the checkpoint (what a ZeRO-3 rank keeps: pipeline/train/zero_load.py). Both directions check every config option that changes the network's function and refuse,
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

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.io import WEIGHTS, load_config
from xlp.xlstm_model.hf_config import (  # noqa: F401 (re-exported: the config half lives there, torch-free)
    CHECKPOINT_KEYS,
    HF_CACHE_MULTIPLE,
    HF_KERNEL_EPS_EXPORT,
    INIT_FROM_SCHEMES,
    HFConversionError,
    _functional_diff,
    check_same_architecture,
    checkpoint_model_keys,
    disagreements,
    from_hf_config,
    parse_init_from,
    read_hf_config,
    to_hf_config,
)
from xlp.xlstm_model.lm import build_model

PathLike = Union[str, os.PathLike]


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
def hf_weight_plan(cfg: ModelConfig, hf_names) -> dict[str, list[str]]:
    """Which transformers weights make each of our tensors: {our name: [their names]}, concatenated along
    dim 0 in that order (fused and single weight modes; an xLSTMModel checkpoint without the `backbone.`
    prefix). A tied model's head is the embedding (no entry). HFConversionError names a weight the
    checkpoint lacks, or one it has that this conversion does not know."""
    names = set(hf_names)
    prefix = "backbone." if any(k.startswith("backbone.") for k in names) else ""
    left = set(names)
    plan: dict[str, list[str]] = {}

    def take(name: str) -> str:
        real = name if name.startswith("lm_head.") else prefix + name.removeprefix("backbone.")
        if real not in names:
            raise HFConversionError(f"checkpoint lacks weight {real!r}")
        left.discard(real)
        return real

    plan["embedding.weight"] = [take("backbone.embeddings.weight")]
    plan["norm.weight"] = [take("backbone.out_norm.weight")]
    if "lm_head.weight" in names:
        head = take("lm_head.weight")
        if not cfg.tie_weights:
            plan["head.weight"] = [head]
    elif not cfg.tie_weights:
        raise HFConversionError("checkpoint lacks lm_head.weight and does not tie it to the embeddings")
    for i in range(cfg.num_blocks):
        s, t = f"blocks.{i}.", f"backbone.blocks.{i}."
        plan[s + "norm.weight"] = [take(t + "norm_mlstm.weight")]
        plan[s + "ffn_norm.weight"] = [take(t + "norm_ffn.weight")]
        plan[s + "head_norm.weight"] = [take(t + "mlstm_layer.multihead_norm.weight")]
        plan[s + "out.weight"] = [take(t + "mlstm_layer.out_proj.weight")]
        plan[s + "ffn.down.weight"] = [take(t + "ffn.proj_down.weight")]
        if prefix + t.removeprefix("backbone.") + "mlstm_layer.qkv_opreact.weight" in names:  # fused
            plan[s + "qkvo.weight"] = [take(t + "mlstm_layer.qkv_opreact.weight")]
            plan[s + "if_gates.weight"] = [take(t + "mlstm_layer.ifgate_preact.weight")]
            plan[s + "if_gates.bias"] = [take(t + "mlstm_layer.ifgate_preact.bias")]
            plan[s + "ffn.gate_up.weight"] = [take(t + "ffn.proj_up_gate_z.weight")]
            continue
        plan[s + "qkvo.weight"] = [take(t + f"mlstm_layer.{n}.weight") for n in ("q", "k", "v", "ogate_preact")]
        plan[s + "if_gates.weight"] = [take(t + "mlstm_layer.igate_preact.weight"),
                                       take(t + "mlstm_layer.fgate_preact.weight")]
        plan[s + "if_gates.bias"] = [take(t + "mlstm_layer.igate_preact.bias"),
                                     take(t + "mlstm_layer.fgate_preact.bias")]
        plan[s + "ffn.gate_up.weight"] = [take(t + "ffn.proj_up_gate.weight"), take(t + "ffn.proj_up.weight")]
    if left:
        raise HFConversionError(f"checkpoint has weights this conversion does not know: {sorted(left)[:5]}")
    return plan


def from_hf_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers xLSTMForCausalLM names (either weight_mode) -> our state dict names."""
    plan = hf_weight_plan(cfg, hf_state)
    out = {ours: hf_state[parts[0]] if len(parts) == 1 else torch.cat([hf_state[n] for n in parts])
           for ours, parts in plan.items()}
    if cfg.tie_weights:
        head = hf_state.get("lm_head.weight")
        if head is not None and not torch.equal(head, out["embedding.weight"]):
            raise HFConversionError("tie_word_embeddings=true but lm_head.weight differs from the embeddings")
        out["head.weight"] = out["embedding.weight"]
    return out


def _safetensors_files(root: Path) -> dict[str, str]:
    """{weight name: file name} of a checkpoint directory: sharded (model.safetensors.index.json) or one
    model.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if (root / "model.safetensors").is_file():
        return {k: "model.safetensors" for k in _safetensors_header(root / "model.safetensors")[0]}
    raise HFConversionError(f"{root}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints convert)")


def read_hf_checkpoint(directory: PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dict, all tensors) of a transformers checkpoint directory; single-file or sharded
    safetensors (model.safetensors.index.json)."""
    from safetensors.torch import load_file

    root = Path(directory)
    hf_cfg = read_hf_config(root)
    state: dict[str, Tensor] = {}
    for f in sorted(set(_safetensors_files(root).values())):
        state.update(load_file(str(root / f)))
    return hf_cfg, state


# safetensors' dtype names -> torch's (the float types checkpoints hold)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a .safetensors file: 8 bytes of header length (little-endian), the
    JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes, row-major."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class CheckpointReader:
    """A checkpoint (`model.init_from`'s "hf:DIR" or "native:DIR") read tensor by tensor, in our names,
    without loading it whole: `shape(name)`, and `read_flat(name, start, stop)`, the elements [start, stop)
    of our tensor flattened, which reads just those bytes of the files (positioned reads, not a memory map:
    the process holds only what it asked for). A rank that keeps one partition of each tensor (ZeRO-3)
    reads that much."""

    def __init__(self, spec: str):
        scheme, path = parse_init_from(spec)
        self.root = Path(path)
        if scheme == "hf":
            self.config = from_hf_config(read_hf_config(self.root))
            files = _safetensors_files(self.root)
            self.plan = hf_weight_plan(self.config, files)
        else:
            self.config = load_config(self.root)
            files = {k: WEIGHTS for k in _safetensors_files_native(self.root)}
            self.plan = {k: [k] for k in files if not (self.config.tie_weights and k == "head.weight")}
        self._entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(files.values())):
            header, data = _safetensors_header(self.root / file)
            for name, info in header.items():
                if info["dtype"] not in _ST_DTYPES:
                    raise HFConversionError(f"{self.root / file}: {name} is {info['dtype']}; only float weights load")
                self._entries[name] = (self.root / file, data + int(info["data_offsets"][0]),
                                       _ST_DTYPES[info["dtype"]], tuple(info["shape"]))

    def names(self) -> list[str]:
        return list(self.plan)

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [self._entries[n][3] for n in self.plan[name]]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read_flat(self, name: str, start: int, stop: int) -> Tensor:
        """Elements [start, stop) of our tensor `name`, flattened (1-D, the checkpoint's dtype)."""
        pieces, offset = [], 0
        for part in self.plan[name]:
            path, at, dtype, shape = self._entries[part]
            size = math.prod(shape)
            lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
            if lo < hi:
                item = torch.empty((), dtype=dtype).element_size()
                buf = bytearray((hi - lo) * item)
                with open(path, "rb") as f:
                    f.seek(at + lo * item)
                    if f.readinto(buf) != len(buf):
                        raise HFConversionError(f"{path}: truncated ({part} ends past the end of the file)")
                pieces.append(torch.frombuffer(buf, dtype=dtype))
            offset += size
        if not pieces:
            return torch.empty(0, dtype=self._entries[self.plan[name][0]][2])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _safetensors_files_native(root: Path) -> list[str]:
    if not (root / WEIGHTS).is_file():
        raise HFConversionError(f"{root}: no {WEIGHTS} (not a model directory saved by this package)")
    return list(_safetensors_header(root / WEIGHTS)[0])


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
    check_same_architecture(ours, theirs, spec)
    load_converted(model, state)
    return theirs
