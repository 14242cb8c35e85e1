"""The train stage: a DeepSpeed ZeRO training loop, on GPUs (NCCL) or CPU processes (gloo).

Modules
  config.py      `train.*` (TrainConfig), its validation, and the DeepSpeed config it gives
  trainer.py     the loop of one rank: Trainer.train_step / validate / save / restore / log, StepStats
  main.py        the rank's entry points: `python -m xlp.pipeline.train.main --run-dir RUN_DIR [KEY=VALUE ...]`
                 and `ray_train_loop` for Ray Train; reads the config, starts the process group
  stop.py        StopRequest and EXIT_STOPPED (torch-free: what the launchers need of a rank)
  hooks.py       TrainHooks: where tests step into the loop (`--hooks module:name`), no-ops otherwise
  launch.py      starts the ranks (local processes, srun in an allocation, Ray Train workers) and
                 watches them with one `supervise()`: log streaming, stop on SIGTERM, failures, hangs
  heartbeat.py   each rank's heartbeat file, and the HangDetector that names a rank that hangs or is lost
  dist.py        rank/world size from torchrun, `deepspeed`, srun, mpirun, Ray Train or nothing
  checkpoint.py  atomic checkpoints (newest train.keep_checkpoints kept) and the consolidated model
  optim.py       AdamW parameter groups (no decay on norms, biases, gates, embeddings), step veto
  schedule.py    warmup + cosine, warmup-stable-decay (a function of the step: nothing to restore)
  monitor.py     W&B (wandb.*), metrics.jsonl, console progress, MFU, memory

Launching outside the stage (the config is the run's resolved config, RUN_DIR/config.yaml; KEY=VALUE
arguments after it override keys, e.g. `train.device=cpu`):
  torchrun --nproc-per-node 8 -m xlp.pipeline.train.main --run-dir RUN_DIR
  deepspeed --num_gpus 8 --module xlp.pipeline.train.main --run-dir RUN_DIR
  srun --ntasks-per-node 8 python -m xlp.pipeline.train.main --run-dir RUN_DIR
  Ray Train: TorchTrainer(xlp.pipeline.train.main.ray_train_loop, train_loop_config={"run_dir": RUN_DIR}, ...)

Outputs in RUN_DIR/train/
  checkpoints/step_XXXXXXXX/  DeepSpeed module/optimizer/engine state + per-rank RNG and loader state
  model/                      model.safetensors + config.json (fp32 master weights, gathered from any
                              ZeRO stage): what eval and export read
  metrics.jsonl               every step's metrics (rank 0), val/loss every train.eval_every steps
  result.json                 final_loss, val_loss, tokens_per_s, mfu, ... (the stage's metrics)
  wandb/, wandb_run_id        the W&B run (offline by default); a rerun continues the same run id
  logs/rank_<r>.log           each rank's output; rank_<r>.error holds a failed rank's message
  logs/heartbeat_<r>.json     each rank's node, pid, step and phase, refreshed every few seconds

Resume: a rerun of the stage (same fingerprint) continues from the newest complete checkpoint, with the
same number of ranks; the result is bitwise the same as an uninterrupted run on the same machine
(tests/test_train.py::test_exact_resume_after_sigkill). SIGTERM/SIGINT: the ranks finish the current
step, save a checkpoint and exit with status 143; the stage fails with "rerun to resume".

Hangs and lost ranks (train.hang_timeout, default 600 s; 0: off): a rank whose heartbeat stops for that
long (stopped, its node lost), or every rank without progress that long once training has begun (stuck in
a collective; the rank behind is named), ends the ranks; so does a rank killed by SIGKILL without an
error of its own. The stage fails with RanksLost naming rank, node, pid, last step and phase; `xlp run`
exits 75 and a rerun resumes. A rank's own exception is an ordinary failure (exit 1).

Non-finite loss or gradients: the step is skipped (no parameter or optimizer-state change) and counted
(train/skipped_steps); train.max_bad_steps in a row fail the run, naming the steps.

Nothing is compiled on CPU: DeepSpeed's shared-memory comm op (only used by its inference all-reduce)
is not built (XLP_DS_SHM_COMM=1 builds it; torch caches JIT ops in $TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions/<python>_<cuda>/, so a CI cache of that directory builds each op once), and
the CPU optimizer is torch's AdamW. On GPUs, train.offload_optimizer uses DeepSpeedCPUAdam, a JIT-built
op cached the same way.

The package's `ray_train_loop` (main.py's) is imported on first use (PEP 562): the launchers that hand it
to Ray Train import this package without loading torch, which `xlp` commands do not need.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_EXPORTS = {"ray_train_loop": "main"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
