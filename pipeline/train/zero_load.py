"""`model.init_from` under ZeRO-3: each rank builds and reads only the partition of every tensor it keeps.

The plain path (`build_model` + `init_from`) holds the whole fp32 model and the whole checkpoint on every
rank before DeepSpeed partitions them: ~27 GB of host memory per rank for a 7B model, ~220 GB on an
8-GPU node. Here the model is built inside `deepspeed.zero.Init`, which partitions each module's weights
as soon as it is constructed (the largest single module is ever whole), and each rank then fills its own
partition from the checkpoint files, reading only those elements (xlstm_model.hf.CheckpointReader slices
the memory-mapped safetensors). No rank ever holds the whole model, and no rank reads all of the files.
"""
from __future__ import annotations

from typing import Any

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.hf import CheckpointReader, check_same_architecture
from xlp.xlstm_model.lm import build_model


def build_partitioned(cfg: ModelConfig, ds_config: dict[str, Any]):
    """The model of `cfg` built under ZeRO-3 partitioning, each rank's partitions filled from
    cfg.init_from (collective: every rank calls it, after torch.distributed is initialised)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    spec = str(cfg.init_from)
    reader = CheckpointReader(spec)
    check_same_architecture(cfg, reader.config, spec)
    # mem_efficient_linear: DeepSpeed would otherwise replace F.linear for the whole process
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = build_model(cfg, init=False)
    wanted = set(reader.names())
    for name, p in model.named_parameters():
        if name not in wanted:
            raise ValueError(f"model.init_from={spec}: the checkpoint has no weight for {name}")
        wanted.discard(name)
        shape = reader.shape(name)
        if shape != tuple(p.ds_shape):
            raise ValueError(f"model.init_from={spec}: {name} is {list(shape)} in the checkpoint, "
                             f"{list(p.ds_shape)} in the run's model")
        # DeepSpeed's layout (partition_parameters._partition_param): rank r of the parameter's group keeps
        # the flat elements [r * size, (r + 1) * size) of the padded tensor
        size = p.ds_tensor.ds_numel
        start = min(size * dist.get_rank(group=p.ds_process_group), p.ds_numel)
        stop = min(start + size, p.ds_numel)
        with torch.no_grad():
            if stop > start:
                p.ds_tensor[: stop - start].copy_(reader.read_flat(name, start, stop))
            p.ds_tensor[stop - start:].zero_()
    if wanted:
        raise ValueError(f"model.init_from={spec}: the run's model has no parameter for {sorted(wanted)[:5]}")
    return model
