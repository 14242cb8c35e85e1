"""The training loop of one rank: a DeepSpeed engine over the shards, stepped to `train.steps`.

    trainer = Trainer(cfg, ...)      # nothing heavy yet
    trainer.run()                    # setup(), then train_step / validate / save / log until done

Every rank runs the same loop; the ranks agree once per step (one all-reduce of the step's loss sum,
non-finite count and stop requests), so a NaN or a SIGTERM on one rank skips or stops the step on all.
"""
from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from xlp import tokenizer
from xlp.kernels.dispatch import used_backends
from xlp.pipeline.core.config import section
from xlp.pipeline.core.layout import CTRL_C, TrainLayout
from xlp.pipeline.core.node import node_name
from xlp.pipeline.core.stage import atomic_write_json
from xlp.pipeline.data.fit import val_split_check
from xlp.pipeline.data.loader import ShardLoader, shards_skipped_everywhere
from xlp.pipeline.data.order import GlobalLoader, Mixture
from xlp.pipeline.train import checkpoint as ckpt
from xlp.pipeline.train import dist as xdist
from xlp.pipeline.train import elastic
from xlp.pipeline.train.elastic import check_resume, grad_accum_for
from xlp.pipeline.train.heartbeat import Heartbeat
from xlp.pipeline.train.hooks import TrainHooks
from xlp.pipeline.train.monitor import Monitor, device_peak_flops, memory_metrics, read_metrics
from xlp.pipeline.train.optim import StepGate, build_optimizer
from xlp.pipeline.train.schedule import continuation_note, schedule_of
from xlp.pipeline.train.stop import EXIT_STOPPED, StopRequest
from xlp.pipeline.train.zero_load import build_partitioned
from xlp.xlstm_model import build_model, count_params, flops_per_token
from xlp.xlstm_model.hf import init_from
from xlp.xlstm_model.sequence_parallel import SeqParallel

class NonFiniteError(RuntimeError):
    pass


class StepOutOfMemory(RuntimeError):
    """A training step could not allocate its memory; the message names the keys that size it."""


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's failure (torch says "can't allocate memory")."""
    return (type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)
            or "CUDA out of memory" in str(error))


@dataclass(frozen=True)
class StepStats:
    """One optimizer step as every rank sees it after the step's all-reduce."""

    step: int
    loss: float  # mean of the finite micro-batch losses of all ranks (nan when none was finite)
    lr: float
    grad_norm: Optional[float]
    applied: bool  # False: a loss or gradient was not finite, and the update was skipped
    seconds: float
    stop: bool  # a rank was asked to stop (SIGTERM/SIGINT): save and end after this step
    # sum of the 32-bit hashes of the step's global rows (index and tokens): equal steps took equal rows,
    # whatever the ranks, grad_accum or loader workers (xlp.pipeline.data.order.row_hash)
    batch_hash: int = 0


def resolve_vocab_size(model_cfg, tokenizer_model: Path) -> int:
    """model.vocab_size, or the tokenizer's vocabulary rounded up to a multiple of 64."""
    if model_cfg.vocab_size:
        if model_cfg.init_from and tokenizer_model.is_file():  # a checkpoint's vocabulary: ids past it would crash
            have = tokenizer.load(tokenizer_model).vocab_size
            if have > model_cfg.vocab_size:
                raise ValueError(
                    f"model.init_from={model_cfg.init_from}: the checkpoint's vocabulary has {model_cfg.vocab_size} "
                    f"ids, the run's tokenizer ({tokenizer_model}) {have}; use the checkpoint's tokenizer "
                    f"(tokenizer.path) or one of at most {model_cfg.vocab_size} ids (tokenizer.vocab_size)")
        return int(model_cfg.vocab_size)
    if not tokenizer_model.is_file():
        raise FileNotFoundError(f"model.vocab_size is null and there is no tokenizer at {tokenizer_model}")

    return int(math.ceil(tokenizer.load(tokenizer_model).vocab_size / 64) * 64)


class Trainer:
    def __init__(self, cfg, *, out: TrainLayout, shard_dir: Path, tokenizer_model: Path, env: xdist.DistEnv,
                 cuda: bool, hooks: Optional[TrainHooks] = None, stop: Optional[StopRequest] = None,
                 started_at: Optional[float] = None, stage_heartbeat: Optional[Callable[[], None]] = None,
                 stale_dir: Optional[Path] = None, heartbeat: Optional[Heartbeat] = None,
                 run_config: Optional[dict] = None, trajectory: Optional[str] = None):
        import torch

        self.cfg = cfg  # the train stage's view of the config (Stage.view: its declared keys only)
        # the whole resolved config, as W&B shows the run (monitoring: it changes nothing trained)
        self.run_config = run_config if run_config is not None else {}
        self.tc = section(cfg, "train")
        self.model_cfg = section(cfg, "model")
        self.out, self.shard_dir, self.tokenizer_model = out, Path(shard_dir), Path(tokenizer_model)
        self.stale_dir = Path(stale_dir) if stale_dir else out.root.parent / ".stale"
        # the train stage's trajectory fingerprint (rank 0's is the one that counts): whose checkpoints these are
        self.trajectory = trajectory
        self.rank, self.world = env.rank, env.world_size
        self.cuda = cuda
        self.device = torch.device(f"cuda:{env.local_rank}") if cuda else torch.device("cpu")
        self.seq_len = int(cfg.data.seq_len)
        # world = data-parallel groups x train.sequence_parallel (ValueError naming the key when it does not split)
        self.grid = xdist.grid(self.rank, self.world, int(self.tc.sequence_parallel), self.seq_len)
        self.sp = None  # this rank's sequence-parallel group (setup), when train.sequence_parallel > 1
        self.seed = int(cfg.run.seed)
        self.hooks = hooks or TrainHooks()
        self.stage_heartbeat = stage_heartbeat  # called on rank 0 now and then (a direct run's stage.json)
        self._last_beat = time.monotonic()
        self.heartbeat = heartbeat  # this rank's heartbeat file: the launcher's hang check reads it
        self.stop = stop if stop is not None else StopRequest()
        self.started_at = time.perf_counter() if started_at is None else started_at
        # where the run stands (restored from a checkpoint)
        self.step, self.tokens_seen, self.skipped_total = 0, 0, 0
        self.last_saved = -1
        # this attempt
        self.bad_in_row, self.first_bad = 0, None
        self.val_loss: Optional[float] = None
        self.loss_value = float("nan")
        self.run_tokens, self.run_time = 0, 0.0  # steps after this attempt's first (warm-up excluded)
        self.timing = {"eval_s": 0.0, "ckpt_s": 0.0}
        self.t_first_done: Optional[float] = None  # the loop's wall time counts from the first step's end
        self.resized: Optional[str] = None  # what changed when a checkpoint continues on other ranks

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Train to train.steps (0), or until a stop request (EXIT_STOPPED, after a checkpoint)."""
        self.setup()
        self.engine.train()
        t_ready = time.perf_counter()
        stopped = False
        while self.step < self.tc.steps:
            try:
                stats = self.train_step()
            except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one too
                if not _out_of_memory(e):
                    raise
                raise StepOutOfMemory(self._out_of_memory_message(e)) from e
            self.account(stats)
            self.log(stats)
            stopped = stats.stop
            if self._due(self.tc.save_every) or stopped:
                self.save()
            if stopped:
                self.monitor.message(f"stopped by {self._stop_cause()} at step {self.step}; checkpoint saved; "
                                     "rerun to resume")
                break
            if self.t_first_done is None:
                self.t_first_done = time.perf_counter()
                self.timing.update(eval_s=0.0, ckpt_s=0.0)
        if not stopped and self.last_saved != self.step:
            self.save()
        return self.finish(stopped, t_ready)

    def _out_of_memory_message(self, error: RuntimeError) -> str:
        """The step's allocation failed (CUDA's out-of-memory error, or the CPU allocator's on a machine
        whose memory the pre-check could not see, e.g. a cgroup or ulimit): name the keys that size it."""
        B, S = int(self.cfg.train.micro_batch_size), int(self.cfg.data.seq_len)
        said = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        fixes = [f"train.micro_batch_size={B // 2} (raise train.grad_accum to keep the batch)"] if B > 1 else []
        fixes.append(f"data.seq_len={max(64, S // 2 // 64 * 64)}")
        if not self.model_cfg.activation_checkpointing:
            fixes.append("model.activation_checkpointing=true")
        return (f"step {self.step} ran out of {self.device.type.upper()} memory on rank {self.rank} with "
                f"train.micro_batch_size={B} rows of data.seq_len={S} tokens ({said}). Set {', or '.join(fixes)}")

    def _stop_cause(self) -> str:
        """What asked the ranks to stop: `xlp run`'s stop request names what stopped it (a Ctrl-C there
        reaches the ranks as their launcher's SIGTERM); else the signal this rank got."""
        asked = self.out.stop_reason()
        if asked is not None:
            return asked
        if not self.stop.requested:
            return "a signal on another rank"
        return CTRL_C if self.stop.signal == signal.SIGINT else signal.Signals(self.stop.signal).name

    def _progress(self, phase: str, reading_data: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.progress(self.step, phase, reading_data=reading_data)

    def _due(self, every: int) -> bool:
        return bool(every and self.step % every == 0) or self.step == self.tc.steps

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """The model, DeepSpeed engine, loaders and monitor; the newest checkpoint restored."""
        import deepspeed

        tc = self.tc
        self._size_global_batch()
        self.sp = self._sequence_parallel_group()
        self.model_cfg.vocab_size = resolve_vocab_size(self.model_cfg, self.tokenizer_model)
        latest = self._agree_on_checkpoint()
        if latest is not None:  # a resize that cannot work fails here, before the engine is built

            self.resized = check_resume(ckpt.read_meta(latest), tc, self.world)
        t_start = time.perf_counter()
        self._seed()
        model = self._build_model(fresh=latest is None)
        model.set_sequence_parallel(self.sp)  # ValueError for the architectures it cannot split
        self.n_params = count_params(self.model_cfg if self.partitioned else model)
        if tc.compile:  # train.compile: compiled blocks, fused AdamW (CPU Adam keeps its own step)
            model.compile_blocks(backend=tc.compile_backend)
        cpu_adam = self.cuda and tc.offload_optimizer
        optimizer = build_optimizer(model, tc, cpu_adam=cpu_adam, fused=tc.compile and not cpu_adam)
        self.gate = StepGate(optimizer)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=tc.deepspeed_config(self.world, self.cuda),
                                                    dist_init_required=False)
        self.zero0 = self.engine.zero_optimization_stage() == 0
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.loader = self._loader("train")
        no_val = self._check_val_split()
        if latest is not None:
            self.restore(latest)
            if self.step > tc.steps:
                raise ValueError(
                    f"train.steps={tc.steps} is below the step of the checkpoint to continue from ({latest}, "
                    f"step {self.step}): set train.steps >= {self.step}, or train.resume_from_step to an "
                    "earlier checkpoint, or use another run.dir")
        self.resumed_from_step = self.step if latest is not None else None
        self.nodes = self._node_names()
        self._first_step_of_attempt = self.step + 1
        self.data = iter(self.loader)
        self.schedule = schedule_of(tc)
        self.tokens_per_step = self.global_batch_rows * self.seq_len
        self.flops_per_token = float(flops_per_token(self.model_cfg, self.seq_len))
        self._start_monitor(latest, no_val, t_start, time.perf_counter())

    def _build_model(self, fresh: bool):
        """The model, initialised by the recipe or, on a fresh start, from model.init_from (a resumed run's
        weights come from its checkpoint). Under ZeRO-3, model.init_from builds it partitioned: each rank
        holds and reads only its share of every tensor (zero_load)."""
        spec = self.model_cfg.init_from if fresh else None
        self.partitioned = bool(spec) and self.tc.zero_stage == 3
        if self.partitioned:
            return build_partitioned(self.model_cfg, self.tc.deepspeed_config(self.world, self.cuda))
        model = build_model(self.model_cfg)
        if spec:  # start from a checkpoint's weights instead of the init recipe
            init_from(model, spec)
        return model

    def _size_global_batch(self) -> None:
        """grad_accum for this many ranks (derived from train.global_batch_size when it is set; a
        ResizeError names the numbers when it does not divide), and the mixture the loader draws."""
        self.tc.grad_accum = grad_accum_for(self.tc, self.grid.dp_size)
        self.global_batch_rows = self.tc.micro_batch_size * self.tc.grad_accum * self.grid.dp_size
        data = section(self.cfg, "data")
        self.data_cfg = data
        self.mixture = Mixture.from_config(data.mixture, data.mixture_phases) if data.mixture else None

    def _sequence_parallel_group(self):
        """This rank's SeqParallel (collective: every rank creates every group, in the same order), or
        None with train.sequence_parallel=1."""
        import torch.distributed as dist

        g = self.grid
        if g.sp_size == 1:
            return None
        mine = None
        for d in range(g.dp_size):
            group = dist.new_group(ranks=list(range(d * g.sp_size, (d + 1) * g.sp_size)))
            if d == g.dp_rank:
                mine = group
        return SeqParallel(mine, g.sp_rank, g.sp_size)

    def _agree_on_checkpoint(self) -> Optional[Path]:
        """The checkpoint every rank resumes from (collective): the newest that verifies, or
        train.resume_from_step's; partial saves removed, damaged ones named in rank 0's log and moved
        aside (xlp.pipeline.train.checkpoint.choose). None: a fresh start."""
        if self.rank == 0:
            self.out.root.mkdir(parents=True, exist_ok=True)
        return ckpt.choose(self.out.checkpoints, rank=self.rank, world_size=self.world,
                           resume_from_step=self.tc.resume_from_step, say=lambda text: print(text, flush=True),
                           aside=self.stale_dir, trajectory=self.trajectory)

    def _continuation_note(self, checkpoint: Path) -> str:
        """What the learning rate does when the checkpoint's run had another train.steps."""
        meta = ckpt.read_meta(checkpoint)
        if "train_steps" not in meta:  # a checkpoint from before runs recorded their length
            return ""
        return continuation_note(at=self.step, old_steps=int(meta["train_steps"]), old_schedule=meta["schedule"],
                                 old_warmup=int(meta["warmup"]), old_wsd_decay=float(meta["wsd_decay"]),
                                 old_exp_decay_steps=meta.get("exp_decay_steps"),
                                 new_steps=self.tc.steps)

    def _mixture_note(self, checkpoint: Path) -> str:
        """What a continuation with other data.mixture_phases means (from the checkpoint on, the new
        weights; steps it already took keep the weights they were drawn with)."""
        old = ckpt.read_meta(checkpoint).get("mixture")
        if self.mixture is None or old is None:
            return ""

        def at(phases: list, step: int) -> dict:
            return [w for start, w in phases if start <= step][-1]

        new = self.mixture.to_json()
        if old == new:
            return ""
        before = [s for s in range(1, self.step + 1) if at(old, s) != at(new, s)]
        if before:
            return (f"data.mixture_phases changed for steps the checkpoint already took ({before[0]}-{before[-1]}): "
                    f"those kept the weights they were drawn with; the new phases apply from step {self.step + 1}")
        return (f"data.mixture_phases changed after the checkpoint (step {self.step}): the run continues with "
                f"the new phases ({Mixture.describe(new)})")

    def _node_names(self) -> list[str]:
        """The distinct nodes the ranks run on, named as xlp.pipeline.core.node names them (collective)."""
        import torch.distributed as dist

        names: list[Any] = [None] * self.world
        dist.all_gather_object(names, node_name())
        self.rank_nodes = names
        return sorted(set(names))

    def _groups_across_nodes(self) -> list[str]:
        """The sequence-parallel groups whose ranks are on more than one node (their per-layer
        exchange then crosses the network), as log lines."""
        g, lines = self.grid, []
        for d in range(g.dp_size if g.sp_size > 1 else 0):
            nodes = sorted(set(self.rank_nodes[d * g.sp_size:(d + 1) * g.sp_size]))
            if len(nodes) > 1:
                lines.append(f"sequence-parallel group {d} (ranks {d * g.sp_size}-{(d + 1) * g.sp_size - 1}) spans "
                             f"nodes {', '.join(nodes)}: its state exchange crosses the network every layer; put a "
                             f"multiple of train.sequence_parallel={g.sp_size} ranks on each node")
        return lines

    def _seed(self) -> None:
        import numpy as np
        import torch

        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def _loader(self, split: str, group: Optional[str] = None):
        """train: this rank's rows of the global order (xlp.pipeline.data.order); val: the val split (of
        one mixture group), split over the ranks."""
        if split == "train":
            return GlobalLoader(self.shard_dir, seq_len=self.seq_len, micro_batch_size=self.tc.micro_batch_size,
                                rows_per_step=self.global_batch_rows, rank=self.grid.dp_rank,
                                world_size=self.grid.dp_size,
                                num_workers=self.tc.num_workers, seed=self.seed, streams=self.data_cfg.streams,
                                mixture=self.mixture, on_error=str(self.cfg.data.on_error))
        return ShardLoader(self.shard_dir, split=split, seq_len=self.seq_len, batch_size=self.tc.micro_batch_size,
                           rank=self.grid.dp_rank, world_size=self.grid.dp_size, num_workers=0, seed=self.seed,
                           on_error=str(self.cfg.data.on_error), group=group, partial=True)

    @property
    def val_groups(self) -> list[Optional[str]]:
        """The val splits validated: each mixture group's, or the one split."""
        return list(self.mixture.groups) if self.mixture is not None else [None]

    def _check_val_split(self) -> Optional[str]:
        """None when every mixture group's val split gives this many ranks a validation row; why not,
        when the shards hold no val split on purpose (data.val_fraction=0). A val split with no row
        raises ValueError naming the group and what works (xlp.pipeline.data.fit)."""
        skipped = val_split_check(self.shard_dir, groups=self.val_groups, seq_len=self.seq_len,
                                  world_size=self.grid.dp_size)
        self.has_val = skipped is None
        return skipped

    def _start_monitor(self, latest: Optional[Path], no_val: Optional[str], t_start: float, t_engine: float) -> None:
        tc = self.tc
        self.monitor = Monitor(enabled=self.rank == 0, out_dir=self.out.root, run_config=self.run_config,
                               wandb_cfg=section(self.cfg, "wandb"), total_steps=tc.steps, start_step=self.step,
                               run_name=str(self.cfg.run.name))
        if no_val is not None:
            self.monitor.message(f"validation skipped: {no_val}")
        for line in self.loader.fewer_streams():
            self.monitor.message(f"data: {line}")
        if latest is None and self.model_cfg.init_from:
            how = ("each rank built its ZeRO-3 partitions and read only those" if self.partitioned
                   else "every rank loaded it whole")
            self.monitor.message(f"weights: model.init_from={self.model_cfg.init_from} ({how})")
        for line in self._groups_across_nodes():
            self.monitor.message(line)
        if latest is not None:
            self.monitor.message(f"resumed from {latest} (step {self.step}, {self.tokens_seen:,} tokens seen)")
            if self.resized:
                self.monitor.message(self.resized)
            note = self._mixture_note(latest)
            if note:
                self.monitor.message(note)
            note = self._continuation_note(latest)
            if note:
                self.monitor.message(f"continuing a run of another length: {note}")
        self.monitor.message(
            f"train: {self.model_cfg.arch}, {self.n_params / 1e6:.2f}M params, ZeRO-{tc.zero_stage}, {tc.precision}, "
            f"{self.world} rank(s) on {'GPU' if self.cuda else 'CPU'}, {tc.steps} steps"
            + (f", sequence_parallel {self.grid.sp_size} ({self.grid.dp_size} data-parallel group(s) of "
               f"{self.grid.sp_size} ranks, {self.seq_len // self.grid.sp_size} tokens of each row a rank)"
               if self.grid.sp_size > 1 else ""))
        self.peak_flops = 0.0
        if self.rank == 0:
            self.peak_flops, source = device_peak_flops(tc.precision, cuda=self.cuda, configured_tflops=tc.peak_tflops)
            self.monitor.summary({"throughput/peak_flops_per_device": self.peak_flops,
                                  "throughput/peak_source": source, "model/params": self.n_params,
                                  "model/flops_per_token": self.flops_per_token,
                                  "train/sequence_parallel": self.grid.sp_size})
        now = time.perf_counter()
        self.monitor.message(f"ready in {now - self.started_at:.1f}s (start-up {t_start - self.started_at:.1f}s, "
                             f"model and engine {t_engine - t_start:.1f}s, MFU reference {now - t_engine:.1f}s)")

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> StepStats:
        """grad_accum micro-batches forward and backward, the ranks' agreement, the optimizer step
        (vetoed on every rank when any loss or gradient is not finite)."""
        import torch
        import torch.distributed as dist

        tc, engine = self.tc, self.engine
        self.step += 1
        lr = self.schedule(self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # finite micro-batch losses
        nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)  # micro-batches that were not
        rows_hash = torch.zeros((), dtype=torch.float64, device=self.device)  # sum of the rows' hashes
        for micro in range(tc.grad_accum):
            self._progress("train", reading_data=True)
            batch = self._batch(next(self.data))
            self._progress("train")
            if self.grid.sp_rank == 0:  # a group's ranks share its rows: count them once
                rows_hash += float(batch["row_hash"])
            loss = engine(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])
            loss = self._row_share(loss, batch["targets"])
            loss = self.hooks.loss(self.step, self.rank, loss)
            lv = loss.detach().double()
            finite = torch.isfinite(lv)
            loss_sum += torch.where(finite, lv, torch.zeros_like(lv))
            nonfinite += (~finite).double()
            engine.backward(loss)
            if micro < tc.grad_accum - 1:
                engine.step()
        stop = torch.tensor(1.0 if self.stop.requested else 0.0, dtype=torch.float64, device=self.device)
        agreed = torch.stack([loss_sum, nonfinite, stop, rows_hash])  # one all-reduce for the four
        dist.all_reduce(agreed)
        all_loss_sum, all_nonfinite, all_stops, all_rows_hash = agreed.tolist()
        skip = all_nonfinite > 0
        grad_norm = self._zero0_grad_norm() if self.zero0 else None
        skip |= grad_norm is not None and not math.isfinite(grad_norm)
        if skip:
            self.gate.close()
        engine.step()
        self.gate.open()
        applied = not skip and engine.was_step_applied()
        if not self.zero0:
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        finite_losses = tc.grad_accum * self.world - all_nonfinite
        loss = all_loss_sum / finite_losses if finite_losses > 0 else float("nan")
        return StepStats(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, applied=applied,
                         seconds=time.perf_counter() - t0, stop=all_stops > 0, batch_hash=int(all_rows_hash))

    def _row_share(self, loss, targets):
        """With sequence parallelism: this rank's slice mean -> (slice's token-loss sum / the rows' targets)
        x N. DeepSpeed averages gradients over all dp x N ranks, so that average is then exactly the mean
        over whole rows, averaged over the data-parallel groups (what one rank per group would compute);
        and the logged loss (the world's sum / (grad_accum x world)) is the same mean."""
        if self.sp is None:
            return loss
        import torch
        import torch.distributed as dist

        count = (targets != -100).sum().to(torch.float64)
        total = count.clone()
        dist.all_reduce(total, group=self.sp.group)
        return loss * (count * self.sp.size / total.clamp(min=1)).to(loss.dtype)

    def _zero0_grad_norm(self) -> float:
        """Under ZeRO-0 the gradients are whole and averaged on every rank after the boundary backward."""
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _batch(self, batch: dict) -> dict:
        if self.sp is not None:  # this rank's tokens of each row
            batch = {k: (self.sp.take(v, 1) if k in ("input_ids", "targets", "doc_starts") else v)
                     for k, v in batch.items()}
        if self.cuda:
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def account(self, stats: StepStats) -> None:
        """Tokens, throughput and skipped steps; train.max_bad_steps skipped in a row fail the run."""
        self.tokens_seen += self.tokens_per_step
        if self.t_first_done is not None:
            self.run_tokens += self.tokens_per_step
            self.run_time += stats.seconds
        self.loss_value = stats.loss
        if stats.applied:
            self.bad_in_row, self.first_bad = 0, None
            return
        self.skipped_total += 1
        self.bad_in_row += 1
        self.first_bad = self.first_bad or stats.step
        self.monitor.message(f"step {stats.step}: non-finite loss or gradients (grad norm {stats.grad_norm}); "
                             f"step skipped ({self.bad_in_row} in a row, {self.skipped_total} in all)")
        if self.bad_in_row >= self.tc.max_bad_steps:
            raise NonFiniteError(
                f"non-finite loss or gradients at step {stats.step}: {self.bad_in_row} steps in a row "
                f"(steps {self.first_bad}-{stats.step}) reached train.max_bad_steps={self.tc.max_bad_steps}")

    # -- validation, logging ------------------------------------------------------------------

    def log(self, stats: StepStats) -> None:
        """The step's metrics to W&B and metrics.jsonl (validation first when it is due), a console line."""
        tokens_per_s = self.tokens_per_step / stats.seconds
        metrics = {
            "train/loss": stats.loss,
            "train/lr": stats.lr,
            "train/grad_norm": stats.grad_norm,
            "train/tokens_seen": self.tokens_seen,
            "train/skipped_steps": self.skipped_total,
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/step_time_s": stats.seconds,
            "throughput/mfu": self._mfu(tokens_per_s),
            "data/batch_hash": stats.batch_hash,
        }
        if self.mixture is not None:
            for group, tokens in self.tokens_by_source().items():
                metrics[f"data/tokens/{group}"] = tokens
        if self.rank == 0:
            metrics.update(memory_metrics(self.cuda))
        if self.has_val and self._due(self.tc.eval_every):
            t = time.perf_counter()
            self._progress("validate")
            self.val_loss, by_group = self.validate()
            self.timing["eval_s"] += time.perf_counter() - t
            metrics["val/loss"] = self.val_loss
            if self.mixture is not None:
                metrics.update({f"val/loss/{g}": v for g, v in by_group.items()})
            self.monitor.message(f"step {stats.step}: val/loss {self.val_loss:.4f}")
        self.monitor.log(stats.step, metrics)
        if self.stage_heartbeat is not None and time.monotonic() - self._last_beat > 10.0:
            self._last_beat = time.monotonic()
            self.stage_heartbeat()
        self.monitor.progress(stats.step, stats.loss, tokens_per_s, log_every=self.tc.log_every,
                              force=stats.step == self.tc.steps)

    def _mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.world) if self.peak_flops > 0 else 0.0

    def tokens_by_source(self) -> dict[str, int]:
        """Training tokens drawn from each mixture group so far (all ranks)."""
        return {g: rows * self.seq_len for g, rows in self.loader.rows_by_group().items()}

    def validate(self) -> tuple[float, dict[str, float]]:
        """Mean validation loss over targets, all ranks, the same batches every time: overall (over
        every group's batches) and per mixture group."""
        import torch

        rng = ckpt.rng_state()  # evaluation must not move the training RNG (exact resume)
        self.engine.eval()
        sums, by_group = [], {}
        for group in self.val_groups:
            total = self._val_sums(group)
            sums.append(total)
            by_group[group or ""] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        self.engine.train()
        ckpt.set_rng_state(rng)
        total = torch.stack(sums).sum(0)
        return (float(total[0] / total[1]) if total[1] > 0 else float("nan")), by_group

    def _val_sums(self, group: Optional[str]):
        """(loss x targets, targets) over up to train.eval_batches val micro-batches of every rank: what
        the split has (a stream's last batch may have fewer rows; a rank whose stream has ended
        contributes nothing)."""
        import torch
        import torch.distributed as dist

        it = iter(self._loader("val", group).one_epoch())
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        n = 0
        with torch.no_grad():
            while self.tc.eval_batches == 0 or n < self.tc.eval_batches:
                self._progress("validate", reading_data=True)
                batch = next(it, None)
                self._progress("validate")
                have = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
                dist.all_reduce(have, op=dist.ReduceOp.MAX)
                if have.item() < 1:
                    break
                n += 1
                if batch is None:
                    # the others still validate: run the same forward passes (ZeRO-3 gathers the
                    # parameters in them, collectively) on one row whose loss is not counted
                    self._val_forward(self._batch(self._blank_row()))
                    continue
                batch = self._batch(batch)
                loss = self._val_forward(batch)
                count = (batch["targets"] != -100).sum().double()
                total[0] += loss.double() * count
                total[1] += count
        dist.all_reduce(total)
        return total

    def _val_forward(self, batch):
        return self.engine(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])

    def _blank_row(self) -> dict:
        import torch

        row = torch.zeros(1, self.seq_len, dtype=torch.int64)
        starts = torch.zeros(1, self.seq_len, dtype=torch.bool)
        starts[:, 0] = True
        return {"input_ids": row, "targets": row.clone(), "doc_starts": starts}

    # -- checkpoints ------------------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint of this step: engine state, and each rank's RNG and loader position (JSON),
        every file fsynced and hashed; DiskFull/CheckpointError when it cannot be written whole."""
        t = time.perf_counter()
        self._progress("save")
        tc = self.tc
        resizable = tc.global_batch_size is not None
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_total,
                "world_size": self.world, "sequence_parallel": self.grid.sp_size, "zero_stage": tc.zero_stage, "precision": tc.precision, "time": time.time(),
                # the global batch and its split; `elastic`: elastic.safetensors is there (any world size)
                "global_batch_size": self.global_batch_rows, "micro_batch_size": tc.micro_batch_size,
                "grad_accum": tc.grad_accum, "elastic": resizable,
                "mixture": self.mixture.to_json() if self.mixture is not None else None,
                "resume_from_step": tc.resume_from_step,  # a branch's lineage (checkpoint.choose)
                # the schedule it was on: a continuation with another train.steps says what that means
                "train_steps": tc.steps, "schedule": tc.schedule, "warmup": tc.warmup, "wsd_decay": tc.wsd_decay,
                "exp_decay_steps": tc.exp_decay_steps,
                # whose checkpoint it is: a resume refuses another trajectory's, pruning deletes only this one's
                ckpt.TRAJECTORY: self.trajectory}
        # the loader state of the whole run (every rank's stream positions merged): loads on any world size
        loader_state = self.loader.global_state(ckpt.all_gather(self.loader.snapshots()))
        ckpt.save(self.engine, self.out.checkpoints, self.step, rank=self.rank, keep=tc.keep_checkpoints, meta=meta,
                  rank_state={"rng": ckpt.rng_state(), "loader": loader_state},
                  write_extra=(lambda folder: elastic.save_state(self.engine, folder, rank=self.rank))
                  if resizable else None, aside=self.stale_dir)
        self.last_saved = self.step
        self.timing["ckpt_s"] += time.perf_counter() - t
        self.monitor.message(f"checkpoint: step {self.step} -> {self.out.checkpoints / ckpt.name_of(self.step)}")
        self.hooks.saved(self.step)

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: engine state, counters, the run's loader state and this rank's RNG.
        On another number of ranks (a resizable run, checked in setup) the engine state comes from the
        checkpoint's elastic.safetensors, resharded, instead of DeepSpeed's per-rank files."""
        meta = ckpt.read_meta(path)
        if int(meta["world_size"]) == self.world:
            meta, rank_state = ckpt.load(self.engine, path, rank=self.rank, world_size=self.world)
        else:  # another world size: our consolidated state, resharded; rank r takes rank r mod N's RNG
            elastic.load_state(self.engine, path, rank=self.rank, step=int(meta["step"]), grad_accum=self.tc.grad_accum,
                               global_batch_rows=self.global_batch_rows)
            rank_state = ckpt.read_json_file(path / ckpt.rank_state_name(self.rank % int(meta["world_size"])))
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.skipped_total = meta.get("skipped_steps", 0)
        self.last_saved = self.step
        self.loader.load_global_state(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])

    # -- the end ----------------------------------------------------------------------------

    def finish(self, stopped: bool, t_ready: float) -> int:
        """The consolidated model (when trained to the end), result.json, the W&B summary."""
        import torch.distributed as dist

        t_end = time.perf_counter()
        self._progress("finish")
        shards_skipped = shards_skipped_everywhere(self.loader)  # collective (an all-gather)
        # Never end on an all-gather: a rank that destroyed its gloo group right after one aborted at exit
        # ("terminate called without an active exception") in 7 of 62 2-rank CPU runs; 0 of 30 with a
        # barrier last (the export ends with one too).
        dist.barrier()
        recorded = None
        if not stopped and self.resumed_from_step == self.step:
            recorded = self._recorded_final_metrics()  # collective (a validation when none is recorded)
        if not stopped:
            self._export_model()
        result = self._result(stopped, t_end, shards_skipped)
        if recorded is not None:
            result.update(recorded)
        if self.rank == 0:
            atomic_write_json(self.out.result, result)
            self.monitor.summary({k: v for k, v in result.items() if v is not None})
            run = self.monitor.run
            if stopped and run is not None and hasattr(run, "mark_preempting"):
                run.mark_preempting()
        self.monitor.message(f"loop {t_end - t_ready:.1f}s, export {time.perf_counter() - t_end:.1f}s")
        self.monitor.finish(exit_code=0)
        return EXIT_STOPPED if stopped else 0

    def _recorded_final_metrics(self) -> dict:
        """The final metrics when this attempt trained no step: it resumed from the checkpoint of the
        last step, which an earlier attempt saved before it was killed (or lost its stage marker). Loss,
        validation loss and throughput are that attempt's, from metrics.jsonl (the counters come from the
        checkpoint); a validation loss metrics.jsonl lacks is measured again on the checkpoint's model
        (collective: every rank validates or none)."""
        import torch
        import torch.distributed as dist

        rows = read_metrics(self.out.metrics) if self.rank == 0 else {}
        last = rows.get(self.step, {})
        val_rows = [r for step, r in sorted(rows.items()) if step <= self.step and r.get("val/loss") is not None]
        val_loss = val_rows[-1]["val/loss"] if val_rows and val_rows[-1]["step"] == self.step else None
        need = torch.tensor([1.0 if self.rank == 0 and self.has_val and val_loss is None else 0.0],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(need)
        if need.item() > 0:
            self._progress("validate")
            val_loss = self.validate()[0]
        timed = [r for step, r in sorted(rows.items()) if step <= self.step and r.get("throughput/step_time_s")]
        timed = timed[1:] or timed  # the first step recorded includes the warm-up, as _result leaves it out
        seconds = sum(float(r["throughput/step_time_s"]) for r in timed)
        tps = self.tokens_per_step * len(timed) / seconds if seconds > 0 else 0.0
        final_loss = last.get("train/loss")
        self.monitor.message(
            f"resumed from the checkpoint of the last step ({self.step}): nothing left to train; the final "
            f"metrics are the recorded ones (metrics.jsonl: loss {final_loss}, val loss {val_loss}, "
            f"{tps:,.0f} tokens/s over {len(timed)} steps)")
        return {"final_loss": final_loss, "val_loss": val_loss, "tokens_per_s": tps, "mfu": self._mfu(tps),
                "metrics_from": str(self.out.metrics)}

    def _export_model(self) -> None:
        import torch.distributed as dist

        state = ckpt.gather_full_state(self.engine, rank=self.rank)
        if self.rank == 0:
            model_dir = ckpt.export_model(state, self.model_cfg, self.out.model_dir)
            self.monitor.message(f"model: {model_dir}")
        dist.barrier()

    def _result(self, stopped: bool, t_end: float, shards_skipped: int) -> dict:
        tps = self.run_tokens / self.run_time if self.run_time > 0 else 0.0
        return {
            "step": self.step,
            "final_loss": self.loss_value,
            "val_loss": self.val_loss,
            "tokens_per_s": tps,
            "mfu": self._mfu(tps),
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_total,
            "shards_skipped": shards_skipped,  # bad shards left out (data.on_error=skip), all ranks
            "params": self.n_params,
            "ranks": self.world,
            "world_size": self.world,
            "sequence_parallel": self.grid.sp_size,
            "nodes": self.nodes,
            "resumed_from_step": self.resumed_from_step,
            "global_batch_size": self.global_batch_rows,
            "grad_accum": self.tc.grad_accum,
            **({"tokens_by_source": self.tokens_by_source()} if self.mixture is not None else {}),
            "model_dir": str(self.out.model_dir),
            "stopped": stopped,
            # wall time of this attempt's loop after its first step: steps, loader, logging, eval, saves
            "loop_s": (t_end - self.t_first_done) if self.t_first_done else 0.0,
            "loop_steps": max(0, self.step - self._first_step_of_attempt),
            **self.timing,
            # {device type: {op: backends}} in this rank: "fallback" on cuda = a GPU run computed with the reference ops
            "kernel_backends": used_backends(),
        }
