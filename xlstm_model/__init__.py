"""The xLSTM family (NeurIPS xLSTM[a:b], xLSTM-large) and a Llama-style baseline, in PyTorch."""
from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.counts import count_params, flops_per_token
from xlp.xlstm_model.io import load_config, load_model, save_model
from xlp.xlstm_model.lm import LanguageModel, build_model, sample

__all__ = [
    "LanguageModel",
    "ModelConfig",
    "build_model",
    "count_params",
    "flops_per_token",
    "load_config",
    "load_model",
    "sample",
    "save_model",
]
