"""Config section of the train stage: `train.*`.

Every field is a config key (`train.lr=1e-3` on the command line). `validate()` raises ValueError
naming the key (`train.<key>`); the pipeline config turns that into a ConfigError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from xlp.pipeline.core.secrets import is_secret_name

SCHEDULES = ("cosine", "wsd", "exp")
PRECISIONS = ("fp32", "bf16")
LAUNCHERS = ("auto", "local", "slurm", "ray")
DEVICES = ("auto", "cpu")
# inductor: generated kernels (needs a C++ compiler on CPU); aot_eager / eager: the traced graph run by
# PyTorch's own ops (checks tracing on CPU without a compiler; no speed-up)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# DeepSpeed keys the train config sets itself: `train.deepspeed` may not set them (use the train key).
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (fp16 is not supported: use bf16)",
    "optimizer": "train.lr, train.betas, train.eps, train.weight_decay (AdamW with parameter groups)",
    "scheduler": "train.schedule, train.warmup, train.min_lr",
}
OWNED_ZERO_KEYS = {
    "stage": "train.zero_stage",
    "offload_optimizer": "train.offload_optimizer",
    "offload_param": "train.offload_params",
}


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps (each: micro_batch_size x grad_accum x ranks sequences)
    micro_batch_size: int = 8  # sequences per rank per micro-step
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16
    cpu_processes: int = 1  # gloo ranks on this machine (per node under srun) when there is no GPU
    # how the ranks start: local processes | slurm (srun in the allocation) | ray (Ray Train workers);
    # auto: local (`xlp submit` sets slurm or ray in the config it sends)
    launcher: str = "auto"
    # auto: one rank per GPU when there are GPUs, else train.cpu_processes gloo ranks; cpu: CPU ranks
    # even where there are GPUs (a launcher passes its choice to the ranks as this key)
    device: str = "auto"
    grad_accum: int = 1  # micro-steps per optimizer step (derived when global_batch_size is set)
    # Rows per optimizer step, kept whatever the number of ranks: grad_accum is then derived on each
    # launch as global_batch_size / (micro_batch_size x ranks), and a checkpoint continues on any number
    # of ranks that divides it (pipeline/train/elastic.py). null: micro_batch_size x grad_accum x ranks,
    # and the run continues on its own number of ranks only.
    global_batch_size: Optional[int] = None
    # torch.compile every model block (model.activation_checkpointing's policy inside the compiled
    # graph; our Triton ops called as custom ops) and step the optimizer with the fused AdamW kernel.
    # Fingerprinted: compiled kernels and the fused step round differently, so the weights differ.
    compile: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (see COMPILE_BACKENDS)
    # Ranks that share each row (sequence parallelism, xlp.xlstm_model.sequence_parallel): the world is
    # data-parallel groups x sequence_parallel, consecutive ranks a group; rank j of a group holds tokens
    # [j S/N, (j+1) S/N) of every row and the mLSTM state passes between them exactly. Must divide the
    # ranks and data.seq_len. The rows of a step and the global batch count data-parallel groups.
    sequence_parallel: int = 1

    # AdamW; no weight decay on norms, biases, embeddings and gate biases (any tensor with ndim < 2)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup: int = 10  # steps of linear warmup from 0 to lr
    # cosine (warmup, cosine decay to min_lr) | wsd (warmup-stable-decay) | exp (warmup, exponential decay,
    # linear cooldown to 0: the xLSTM 7B schedule, pipeline/train/schedule.py)
    schedule: str = "cosine"
    wsd_decay: float = 0.2  # wsd, exp: fraction of train.steps spent in the final (linear) decay
    # exp: steps after the warmup in which the learning rate falls exponentially from lr to min_lr (it goes on
    # falling at that rate until the cooldown). A fixed rate: a longer run follows the same curve, so it can
    # be continued. null: min_lr is reached where the cooldown starts (the rate then depends on train.steps).
    exp_decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    # checkpoints, evaluation, logging
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    # Where the checkpoints go when not in RUN_DIR/train/checkpoints (an absolute path, e.g. a bigger
    # file system): that folder is then a link to it. Any other link out of the run directory is refused
    # (it could hold another run's checkpoints). Use one folder per run.
    checkpoint_dir: Optional[str] = None
    eval_every: int = 50  # steps between validation passes (0: only at the end)
    eval_batches: int = 8  # validation micro-batches per rank per pass (0: the whole val split)
    log_every: int = 10  # steps between console lines (W&B and metrics.jsonl get every step)
    max_bad_steps: int = 5  # consecutive non-finite steps (skipped) before the stage fails
    # seconds a rank may go without a heartbeat (stopped, its node lost), or every rank without progress
    # (stuck in a collective), before the launcher ends the ranks and the stage fails as retryable
    # (`xlp run` exits 75). Must exceed the longest step, validation pass, checkpoint save and export.
    # 0: no hang check.
    hang_timeout: float = 600.0
    # Ray Train (train.launcher=ray): times it restarts the ranks, from the last checkpoint, after a
    # worker or its node was lost. A Slurm job requeues itself instead (slurm.max_requeues).
    max_restarts: int = 3
    # continue from the checkpoint of this step instead of the newest (e.g. the last one before a WSD
    # decay, to extend a run without its decayed weights); null: the newest verified checkpoint
    resume_from_step: Optional[int] = None

    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (zero_stage >= 1)
    offload_params: bool = False  # ZeRO-Infinity parameter offload to CPU (zero_stage 3)
    # Any other DeepSpeed config key, merged over the generated config (e.g.
    # {zero_optimization: {reduce_bucket_size: 5e7}, communication_data_type: fp32}).
    deepspeed: dict[str, Any] = field(default_factory=dict)

    # Environment variables for every rank, over the launcher's defaults (pipeline/cluster/plan.py), e.g.
    # {NCCL_SOCKET_IFNAME: ib0, NCCL_DEBUG: WARN}. Not for secrets: the job's environment has those.
    env: dict[str, str] = field(default_factory=dict)

    num_workers: int = 0  # loader worker processes per rank
    threads: int = 0  # torch CPU threads per rank (0: CPU cores / ranks on this machine)
    peak_tflops: Optional[float] = None  # per-device peak for MFU (None: known GPUs' table; CPU: measured)

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"config key `train.{key}` {msg}")

        for key in ("steps", "micro_batch_size", "cpu_processes", "grad_accum", "keep_checkpoints",
                    "max_bad_steps", "sequence_parallel"):
            if getattr(self, key) < 1:
                raise bad(key, f"is {getattr(self, key)}; must be >= 1")
        for key in ("warmup", "max_restarts", "save_every", "eval_every", "eval_batches", "log_every", "num_workers",
                    "threads"):
            if getattr(self, key) < 0:
                raise bad(key, f"is {getattr(self, key)}; must be >= 0")
        if not self.hang_timeout >= 0:
            raise bad("hang_timeout", f"is {self.hang_timeout}; must be >= 0 (seconds; 0 disables the hang check)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"is {self.zero_stage}; valid values: 0, 1, 2, 3")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"is {self.precision!r}; valid values: {', '.join(PRECISIONS)}")
        if self.launcher not in LAUNCHERS:
            raise bad("launcher", f"is {self.launcher!r}; valid values: {', '.join(LAUNCHERS)}")
        if self.device not in DEVICES:
            raise bad("device", f"is {self.device!r}; valid values: {', '.join(DEVICES)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"is {self.schedule!r}; valid values: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise bad("lr", f"is {self.lr}; must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", f"is {self.min_lr}; must be between 0 and train.lr ({self.lr})")
        if self.exp_decay_steps is not None and self.exp_decay_steps < 1:
            raise bad("exp_decay_steps", f"is {self.exp_decay_steps}; must be >= 1 or null")
        if self.schedule == "exp" and not self.min_lr > 0:
            raise bad("min_lr", f"is {self.min_lr}; the exp schedule decays from train.lr towards it by a ratio, so "
                      "it must be > 0 (e.g. 0.1 x train.lr, as xLSTM 7B)")
        if not 0 < self.wsd_decay <= 1:
            raise bad("wsd_decay", f"is {self.wsd_decay}; must be in (0, 1]")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"is {self.weight_decay}; must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"is {list(self.betas)}; must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not self.eps > 0:
            raise bad("eps", f"is {self.eps}; must be > 0")
        if self.grad_clip < 0:
            raise bad("grad_clip", f"is {self.grad_clip}; must be >= 0 (0 disables clipping)")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise bad("compile_backend", f"is {self.compile_backend!r}; valid values: {', '.join(COMPILE_BACKENDS)}")
        if self.compile and self.zero_stage == 3:
            raise bad("compile", "needs train.zero_stage <= 2: ZeRO-3 gathers each block's parameters in module "
                      "hooks, which compiled blocks are not tested with; use train.compile=false with ZeRO-3")
        if self.offload_optimizer and self.zero_stage < 1:
            raise bad("offload_optimizer", "needs train.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise bad("offload_params", "needs train.zero_stage=3")
        if self.checkpoint_dir is not None and not Path(str(self.checkpoint_dir)).expanduser().is_absolute():
            raise bad("checkpoint_dir", f"is {self.checkpoint_dir!r}; must be an absolute path (every node and rank "
                      "resolves it alike), or null for RUN_DIR/train/checkpoints")
        if self.resume_from_step is not None and self.resume_from_step < 1:
            raise bad("resume_from_step", f"is {self.resume_from_step}; must be >= 1 or null")
        if self.global_batch_size is not None and (self.global_batch_size < 1 or
                                                   self.global_batch_size % self.micro_batch_size):
            raise bad("global_batch_size", f"is {self.global_batch_size}; must be a positive multiple of "
                      f"train.micro_batch_size ({self.micro_batch_size}), or null")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise bad("peak_tflops", f"is {self.peak_tflops}; must be > 0 or null")
        for name in self.env or {}:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
                raise bad(f"env.{name}", "is not an environment variable name (letters, digits, _)")
            if is_secret_name(str(name)):
                raise bad(f"env.{name}", f"looks like a secret: the config is saved with the run; export {name} "
                          "in the job's environment instead (the ranks inherit it)")
        ds = dict(self.deepspeed or {})
        for key, owner in OWNED_DEEPSPEED_KEYS.items():
            if key in ds:
                raise bad(f"deepspeed.{key}", f"is set by {owner}; set that instead")
        zero = ds.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            raise bad("deepspeed.zero_optimization", "must be a mapping")
        for key, owner in OWNED_ZERO_KEYS.items():
            if key in zero:
                raise bad(f"deepspeed.zero_optimization.{key}", f"is set by {owner}; set that instead")

    def deepspeed_config(self, world_size: int, cuda: bool) -> dict[str, Any]:
        """The DeepSpeed config from train.*, with train.deepspeed merged over it."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.micro_batch_size * self.grad_accum * world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16", "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            # on CPU the torch AdamW works on the offloaded states (DeepSpeedCPUAdam is a JIT-built op)
            "zero_force_ds_cpu_optimizer": bool(cuda),
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(cfg, dict(self.deepspeed or {}))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
