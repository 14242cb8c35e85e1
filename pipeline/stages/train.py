"""The `train` stage: DeepSpeed ZeRO training of `model.*` on the shards, resumable.

Launches the ranks (xlp.pipeline.cluster.launch) with the stage's resolved config, and returns rank 0's
result (final loss, validation loss, tokens/s, ...). A rerun with the same fingerprint resumes from
the newest complete checkpoint in RUN_DIR/train/checkpoints.
"""
from __future__ import annotations

import json
import os
import sys

from xlp.pipeline.cluster.launch import choose_launcher, count_gpus, launch, visible_devices_for_ranks
from xlp.pipeline.core import registry
from xlp.pipeline.core.layout import check_train_paths
from xlp.pipeline.core.stage import StageContext
from xlp.pipeline.data.fit import val_split_check
from xlp.pipeline.train.elastic import refuse_before_launch
from xlp.pipeline.train.memory import refuse_if_it_cannot_fit

STAGE = registry.TRAIN


def run(ctx: StageContext) -> dict:
    layout = ctx.layout
    out = layout.train
    # before any rank starts (the ranks check again: a run started without `xlp run` too)
    check_train_paths(layout.root, out, ctx.cfg.train.checkpoint_dir, create=True)
    out.root.mkdir(parents=True, exist_ok=True)
    # One channel: the ranks read the run's config as the runner saved it (RUN_DIR/config.yaml, credentials
    # masked: they read no source URL, and get secret variables from their environment), plus the
    # launcher's overrides on their command line (train.device=cpu).
    config = layout.config
    out.result.unlink(missing_ok=True)
    world, gpus = local_ranks(ctx.cfg)
    if world is not None:  # the global batch splits over the ranks, and matches the checkpoint's: checked

        resized = refuse_before_launch(ctx.cfg, out.checkpoints, world)
        if resized:
            print(f"train: {resized}", flush=True)
        if not gpus:  # CPU ranks: a micro-batch whose activations cannot fit is refused, not killed later
            refuse_if_it_cannot_fit(ctx.cfg, layout.tokenizer_model, world)
        # a val split with no row is refused here, before the ranks start (they check again: Slurm, Ray)
        val_split_check(layout.shard_dir, groups=list(ctx.cfg.data.mixture) or [None],
                        seq_len=int(ctx.cfg.data.seq_len), world_size=world // int(ctx.cfg.train.sequence_parallel))
    ranks = launch(ctx.run_dir, config=config, cpu_processes=int(ctx.cfg.train.cpu_processes),
                   out_dir=out.root, shard_dir=layout.shard_dir, threads=int(ctx.cfg.train.threads),
                   stream=sys.stdout, launcher=str(ctx.cfg.train.launcher), device=str(ctx.cfg.train.device),
                   hang_timeout=float(ctx.cfg.train.hang_timeout), max_restarts=int(ctx.cfg.train.max_restarts),
                   sequence_parallel=int(ctx.cfg.train.sequence_parallel),
                   extra_env={str(k): str(v) for k, v in ctx.cfg.train.env.items()})
    result = json.loads(out.result.read_text())
    result["ranks"] = ranks
    result["model_dir"] = str(out.model_dir)
    return result


def local_ranks(cfg) -> "tuple[int | None, int]":
    """(the ranks the local launcher will start: one per GPU, else train.cpu_processes; the GPUs they
    use). (None, 0) under slurm or ray, where the ranks check the resize themselves."""
    try:
        if choose_launcher(str(cfg.train.launcher)) != "local":
            return None, 0
    except Exception:  # noqa: BLE001  (launch() reports a bad launcher)
        return None, 0
    env = dict(os.environ)
    visible_devices_for_ranks(env)
    gpus = count_gpus(env, str(cfg.train.device))
    return gpus or int(cfg.train.cpu_processes), gpus
