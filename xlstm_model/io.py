"""Save and load models: safetensors weights plus the ModelConfig as JSON, so a directory alone
rebuilds the model."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Union

import torch

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.lm import LanguageModel, as_model_config, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "xlstm-pipeline/model/v1"


def save_model(model: torch.nn.Module, cfg: ModelConfig, directory: Union[str, os.PathLike]) -> Path:
    """Write `directory/model.safetensors` and `directory/config.json` (written last, atomically,
    so a half-written directory never loads)."""
    from safetensors.torch import save_model as _save_safetensors  # here: `import xlstm_model` needs only torch

    cfg = as_model_config(cfg)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors' save_model drops the duplicate name of tied weights (head = embedding).
    _save_safetensors(model, str(out / WEIGHTS), metadata={"format": FORMAT})
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "model": dataclasses.asdict(cfg)}, indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG)
    return out


def load_config(directory: Union[str, os.PathLike]) -> ModelConfig:
    data = json.loads((Path(directory) / CONFIG).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{directory}/{CONFIG}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
    model = dict(data["model"])
    if model.get("arch") == "xlstm_large" and "head_norm" not in model:
        model["head_norm"] = "rms"  # saved before the key existed: xlstm_large then used RMS head norms
    return as_model_config(model)


def load_model(directory: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> LanguageModel:
    """Rebuild the model saved in `directory` with its weights, on `map_location`."""
    from safetensors.torch import load_file

    cfg = load_config(directory)
    with torch.device("meta"):  # no time spent on an init the weights overwrite
        model = build_model(cfg)
    state = load_file(str(Path(directory) / WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_weights:
        model.head.weight = model.embedding.weight  # assign=True replaced the shared Parameter
        missing = [k for k in missing if k not in ("head.weight", "embedding.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model
