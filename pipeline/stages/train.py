"""The `train` stage: DeepSpeed ZeRO training of `model.*` on the shards, resumable.

Launches the ranks (xlp.pipeline.train.launch) with the stage's resolved config, and returns rank 0's
result (final loss, validation loss, tokens/s, ...). A rerun with the same fingerprint resumes from
the newest complete checkpoint in RUN_DIR/train/checkpoints.
"""
from __future__ import annotations

import json
import os
import sys

from xlp.pipeline.stage import Stage, StageContext, atomic_write_text

# The registry imports this module: torch, DeepSpeed and the loop are imported inside run().

STAGE = Stage(
    name="train",
    # wandb.* is read at run time but not hashed: monitoring settings change no result
    # the rows of each step: data.seq_len, data.streams, data.mixture's weights and phases, run.seed
    # (xlp.pipeline.data.order) and the global batch
    reads=("model", "train", "data.seq_len", "data.streams", "data.mixture", "data.mixture_phases", "run.seed",
           "kernels"),
    # where the ranks run (and their transport settings, train.env), how often they log, validate and
    # save, what they keep, how long a rank may hang or how often it restarts, and the loader's worker
    # processes (the global order does not depend on them) change nothing the stage's training computes
    ignores=("train.launcher", "train.device", "train.log_every", "train.save_every", "train.keep_checkpoints",
             "train.eval_every", "train.eval_batches", "train.threads", "train.peak_tflops", "train.num_workers",
             "train.env", "train.hang_timeout", "train.max_restarts"),
    # a longer (or shorter) run of the same trajectory continues from the checkpoints already there; so
    # does one on another number of ranks or micro-batch split of the same global batch (the ranks refuse
    # one whose global batch differs from its checkpoint's: pipeline/train/elastic.py), and one whose
    # mixture phases changed (from the checkpoint on, the new weights apply)
    continues=("train.steps", "train.resume_from_step", "train.cpu_processes", "train.grad_accum",
               "train.micro_batch_size", "data.mixture_phases"),
    needs=("tokenizer", "shard"),
    fn="xlp.pipeline.stages.train:run",
    resumable=True,
    headline=("final_loss", "val_loss", "tokens_per_s", "mfu", "skipped_steps"),
    description="DeepSpeed ZeRO training (gloo ranks on CPU, one rank per GPU); checkpoints, W&B",
    inputs=("xlp.pipeline.data.listing:init_from",),  # the model.init_from checkpoint's files (listing.py)
)


def run(ctx: StageContext) -> dict:
    from xlp.pipeline.secrets import redact_config_yaml
    from xlp.pipeline.train.launch import launch

    layout = ctx.layout
    out = layout.train
    out.root.mkdir(parents=True, exist_ok=True)
    config = out.config  # the ranks read this copy: the run's config with our view of it
    # credentials masked: the ranks read no source URL (they read the shards) and get secret
    # variables from their environment
    atomic_write_text(config, redact_config_yaml(ctx.cfg))
    out.result.unlink(missing_ok=True)
    world = local_world_size(ctx.cfg)
    if world is not None:  # the global batch splits over the ranks, and matches the checkpoint's: checked
        from xlp.pipeline.train.elastic import refuse_before_launch  # before any rank starts

        resized = refuse_before_launch(ctx.cfg, out.checkpoints, world)
        if resized:
            print(f"train: {resized}", flush=True)
    ranks = launch(ctx.run_dir, config=config, cpu_processes=int(ctx.cfg.train.cpu_processes),
                   out_dir=out.root, shard_dir=layout.shard_dir, threads=int(ctx.cfg.train.threads),
                   stream=sys.stdout, launcher=str(ctx.cfg.train.launcher), device=str(ctx.cfg.train.device),
                   hang_timeout=float(ctx.cfg.train.hang_timeout), max_restarts=int(ctx.cfg.train.max_restarts),
                   extra_env={str(k): str(v) for k, v in ctx.cfg.train.env.items()})
    result = json.loads(out.result.read_text())
    result["ranks"] = ranks
    result["model_dir"] = str(out.model_dir)
    return result


def local_world_size(cfg) -> "int | None":
    """The ranks the local launcher will start (one per GPU, else train.cpu_processes); None under
    slurm or ray, where the ranks check the resize themselves."""
    from xlp.pipeline.train.launch import choose_launcher, count_gpus, visible_devices_for_ranks

    try:
        if choose_launcher(str(cfg.train.launcher)) != "local":
            return None
    except Exception:  # noqa: BLE001  (launch() reports a bad launcher)
        return None
    env = dict(os.environ)
    visible_devices_for_ranks(env)
    return count_gpus(env, str(cfg.train.device)) or int(cfg.train.cpu_processes)
