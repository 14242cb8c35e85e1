"""A trained model as `xlp generate`, `xlp export` and the lm-eval adapter find and load it: in a run
directory (RUN_DIR/train/model + RUN_DIR/tokenizer) or an export directory, with the run's `kernels.*` and
`decode.*` settings."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from xlp import tokenizer as tk
from xlp.kernels.config import KernelsConfig
from xlp.pipeline.core.config import merge_into, parse_override, read_run_config
from xlp.pipeline.core.errors import ConfigError
from xlp.pipeline.core.layout import RunLayout
from xlp.xlstm_model import load_model
from xlp.xlstm_model.config import DecodeConfig
from xlp.xlstm_model.hf import load_hf_model

TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece model in an exported directory (LlamaTokenizer reads it)


class ExportError(ValueError):
    pass


def find_model(source: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer file) of a run directory (RUN_DIR/train/model, RUN_DIR/tokenizer) or of
    an export directory (both inside): tokenizer.model, or tokenizer.json for a Hugging Face tokenizer."""
    source = Path(source)
    run = RunLayout(source)
    if (run.train.model_dir / "config.json").is_file():
        model_dir, tok = run.train.model_dir, run.tokenizer_model
    elif (source / "config.json").is_file():
        model_dir, tok = source, tk.find_in(source)
    else:
        raise ExportError(f"{source}: neither a run directory with a trained model (RUN_DIR/train/model/) "
                          "nor an exported model directory (config.json)")
    if not tok.is_file():
        raise ExportError(f"{source}: no tokenizer at {tok}")
    return model_dir, tok


def load_any(model_dir: Path, map_location: str = "cpu"):
    """Our saved model or a transformers xLSTM checkpoint -> LanguageModel."""
    data = json.loads((Path(model_dir) / "config.json").read_text())
    if data.get("model_type") == "xlstm":
        return load_hf_model(model_dir).to(map_location)

    return load_model(model_dir, map_location=map_location)


SETTINGS_SECTIONS = ("kernels", "decode")


def model_settings(source: Path, overrides=()):
    """(KernelsConfig, DecodeConfig) for running the model of `source`: the `kernels` and `decode`
    sections of the run's config (RUN_DIR/config.yaml; their defaults for an export directory), then
    `overrides` (`kernels.*` / `decode.*` key=value items), validated."""
    cfg = OmegaConf.create({"kernels": OmegaConf.structured(KernelsConfig),
                            "decode": OmegaConf.structured(DecodeConfig)})
    config_file = RunLayout(source).config
    if config_file.is_file():
        data = yaml.safe_load(read_run_config(config_file)) or {}  # checked whole
        merge_into(cfg, {k: data[k] for k in SETTINGS_SECTIONS if data.get(k)}, f"config file {config_file}")
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or key.split(".")[0] not in SETTINGS_SECTIONS:
            raise ConfigError(f"override {item!r}: only kernels.* and decode.* keys can be set here "
                              "(e.g. kernels.backend=triton decode.fused=true)")
        merge_into(cfg, parse_override(item), f"command-line override {key!r}")
    kernels, decode = OmegaConf.to_object(cfg["kernels"]), OmegaConf.to_object(cfg["decode"])
    for part in (kernels, decode):
        try:
            part.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return kernels, decode


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
