"""The `train` stage: DeepSpeed ZeRO training of `model.*` on the shards, resumable.

Launches the ranks (pipeline.train.launch) with the stage's resolved config, and returns rank 0's
result (final loss, validation loss, tokens/s, ...). A rerun with the same fingerprint resumes from
the newest complete checkpoint in RUN_DIR/train/checkpoints.
"""
from __future__ import annotations

import json
import sys

from pipeline.stage import StageContext, atomic_write_text


def run(ctx: StageContext) -> dict:
    from omegaconf import OmegaConf

    from pipeline.train.launch import launch

    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"  # the ranks read this copy: the run's config with our view of it
    atomic_write_text(config, OmegaConf.to_yaml(ctx.cfg, resolve=True))
    result_file = out / "result.json"
    result_file.unlink(missing_ok=True)
    ranks = launch(ctx.run_dir, config=config, cpu_processes=int(ctx.cfg.train.cpu_processes),
                   out_dir=out, shard_dir=ctx.input_dir("shard"), threads=int(ctx.cfg.train.threads),
                   stream=sys.stdout, launcher=str(OmegaConf.select(ctx.cfg, "train.launcher", default="auto")))
    result = json.loads(result_file.read_text())
    result["ranks"] = ranks
    result["model_dir"] = str(out / "model")
    return result
