"""One training rank: `python -m pipeline.train.main --run-dir RUN_DIR [--config FILE]`.

Runs under any launcher (see pipeline.train.dist): the train stage's own (`train.cpu_processes` gloo
ranks, or one rank per GPU), `torchrun`, `deepspeed`, `srun`, `mpirun`, or none (one process). It reads
the resolved config (default RUN_DIR/config.yaml, which the runner writes), the tokenizer and shards of
RUN_DIR, and writes RUN_DIR/train/: checkpoints/, model/ (consolidated safetensors), metrics.jsonl,
result.json, the W&B run.

Exit status: 0 trained to train.steps; 143 stopped by SIGTERM/SIGINT after saving a checkpoint; 1 error
(the message is also in RUN_DIR/train/logs/rank_<r>.error).

For tests, XLP_TRAIN_FAULTS injects faults: `nan_loss@5`, `nan_loss@5-7` (rank 0's loss becomes NaN at
those steps), `kill_after_save@30` (every rank SIGKILLs itself once the step-30 checkpoint is whole).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

from pipeline.train import dist as xdist

STOP: dict[str, Any] = {"signal": None}
T0 = time.perf_counter()
EXIT_STOPPED = 143


class NonFiniteError(RuntimeError):
    pass


def _on_signal(signum, frame):  # noqa: ARG001
    STOP["signal"] = signum


def parse_faults(spec: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, steps = item.partition("@")
        lo, _, hi = steps.partition("-")
        out.setdefault(kind, set()).update(range(int(lo), int(hi or lo) + 1))
    return out


def resolve_vocab_size(model_cfg, run_dir: Path) -> int:
    """model.vocab_size, or the tokenizer's vocabulary rounded up to a multiple of 64."""
    if model_cfg.vocab_size:
        return int(model_cfg.vocab_size)
    path = run_dir / "tokenizer" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"model.vocab_size is null and there is no tokenizer at {path}")
    import tokenizer

    return int(math.ceil(tokenizer.load(path).vocab_size / 64) * 64)


def deepspeed_config(tc, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config from train.*, with train.deepspeed merged over it."""
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        # on CPU the torch AdamW works on the offloaded states (DeepSpeedCPUAdam is a JIT-built op)
        "zero_force_ds_cpu_optimizer": bool(cuda),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(cfg, dict(tc.deepspeed or {}))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def _section_classes() -> dict:
    from pipeline.config import WandbConfig
    from pipeline.train.config import TrainConfig
    from xlstm_model import ModelConfig

    return {"train": TrainConfig, "model": ModelConfig, "wandb": WandbConfig}


def typed_section(cfg, name: str):
    """`cfg.<name>` as its dataclass (schema defaults filled in, types checked)."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(_section_classes()[name]), cfg.get(name) or {})
    return OmegaConf.to_object(node)


def load_run_config(path: Path):
    """The resolved run config the runner (or the stage) wrote. Only the sections training uses are
    checked here; the runner validated the whole config before starting the stage."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    OmegaConf.resolve(cfg)
    for name in _section_classes():
        obj = typed_section(cfg, name)
        check = getattr(obj, "validate", None)
        if check is not None:
            check()
    for key in ("data.seq_len", "run.seed", "run.name"):
        if OmegaConf.select(cfg, key) is None:
            raise ValueError(f"config {path} lacks `{key}`")
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.train.main", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--config", type=Path, help="resolved config (default RUN_DIR/config.yaml)")
    ap.add_argument("--out-dir", type=Path, help="default RUN_DIR/train")
    ap.add_argument("--shard-dir", type=Path, help="default RUN_DIR/shard")
    # the `deepspeed` launcher passes --local_rank (LOCAL_RANK is in the environment as well)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return run_rank(args.run_dir, config=args.config, out_dir=args.out_dir, shard_dir=args.shard_dir)


def ray_train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer (which sets RANK, WORLD_SIZE, LOCAL_RANK and
    starts the process group):
        TorchTrainer(ray_train_loop, train_loop_config={"run_dir": "runs/demo"},
                     scaling_config=ScalingConfig(num_workers=8, use_gpu=True)).fit()
    """
    code = run_rank(Path(config["run_dir"]), config=config.get("config"), out_dir=config.get("out_dir"),
                    shard_dir=config.get("shard_dir"), exit_on_error=False)
    if code != 0:
        raise RuntimeError(f"training stopped early (exit status {code}); a checkpoint was saved")


def run_rank(run_dir: Path, *, config: Optional[Path] = None, out_dir: Optional[Path] = None,
             shard_dir: Optional[Path] = None, exit_on_error: bool = True) -> int:
    """This process's rank of the job, to the end. Returns the exit status (0 or EXIT_STOPPED)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "train"
    config_path = Path(config) if config else run_dir / "config.yaml"
    shard_dir = Path(shard_dir) if shard_dir else run_dir / "shard"

    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    # DeepSpeed calls torch.distributed functions torch has deprecated: one warning per rank and call site
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    d = xdist.setup_env()
    cuda = xdist.use_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    error_file = out_dir / "logs" / f"rank_{d.rank}.error"
    try:
        error_file.unlink()
    except FileNotFoundError:
        pass

    import torch
    import torch.distributed as dist

    own_group = not (dist.is_available() and dist.is_initialized())  # Ray Train starts its own
    try:
        cfg = load_run_config(config_path)
        threads = typed_section(cfg, "train").threads or max(1, len(os.sched_getaffinity(0)) // max(1, d.local_size))
        torch.set_num_threads(threads)

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        xdist.import_muon_without_compile()
        if not cuda:
            xdist.skip_shm_comm_build()
        else:
            torch.cuda.set_device(d.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        return Trainer(cfg, run_dir=run_dir, out_dir=out_dir, shard_dir=shard_dir, env=d, cuda=cuda).run()
    except BaseException as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(msg + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        if not exit_on_error:
            own_group = False  # a peer may be blocked in a collective: leave the group to its owner
            raise
        # a peer may be blocked in a collective; the launcher ends it. Skip the group teardown.
        os._exit(1)
    finally:
        if own_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg, *, run_dir: Path, out_dir: Path, shard_dir: Path, env: xdist.DistEnv, cuda: bool):
        import torch

        self.cfg = cfg
        self.tc = typed_section(cfg, "train")
        self.model_cfg = typed_section(cfg, "model")
        self.wandb_cfg = typed_section(cfg, "wandb")
        self.run_dir, self.out_dir, self.shard_dir = Path(run_dir), Path(out_dir), Path(shard_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.env = env
        self.rank, self.world = env.rank, env.world_size
        self.cuda = cuda
        self.device = torch.device(f"cuda:{env.local_rank}") if cuda else torch.device("cpu")
        self.seq_len = int(cfg.data.seq_len)
        self.seed = int(cfg.run.seed)
        self.faults = parse_faults(os.environ.get("XLP_TRAIN_FAULTS", ""))
        backend = str(_select(cfg, "kernels.backend") or "auto")
        if backend != "auto":  # "auto" leaves XLP_KERNEL_BACKEND (or auto) in charge
            from kernels.dispatch import set_default_backend

            set_default_backend(backend)

    # -- setup ------------------------------------------------------------------------------

    def _seed(self) -> None:
        import numpy as np
        import torch

        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def _agree_on_checkpoint(self) -> Optional[Path]:
        import torch.distributed as dist

        from pipeline.train import checkpoint as ckpt

        box: list[Any] = [None]
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.ckpt_root)
            latest = ckpt.latest_checkpoint(self.ckpt_root)
            box[0] = str(latest) if latest else None
        dist.broadcast_object_list(box, src=0)
        return Path(box[0]) if box[0] else None

    def _loader(self, split: str):
        from pipeline.data.loader import ShardLoader

        return ShardLoader(self.shard_dir, split=split, seq_len=self.seq_len, batch_size=self.tc.micro_batch_size,
                           rank=self.rank, world_size=self.world, num_workers=self.tc.num_workers if split == "train" else 0,
                           seed=self.seed)

    def _batch(self, batch: dict) -> dict:
        if self.cuda:
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        import deepspeed
        import torch
        import torch.distributed as dist

        from pipeline.train import checkpoint as ckpt
        from pipeline.train.monitor import Monitor, device_peak_flops, memory_metrics
        from pipeline.train.optim import StepGate, build_optimizer
        from pipeline.train.schedule import schedule_of
        from xlstm_model import build_model, count_params, flops_per_token

        tc = self.tc
        self.model_cfg.vocab_size = resolve_vocab_size(self.model_cfg, self.run_dir)
        latest = self._agree_on_checkpoint()
        t_start = time.perf_counter()

        self._seed()
        model = build_model(self.model_cfg)
        if model.config.init_from:  # start from a checkpoint's weights instead of the init recipe
            from xlstm_model.hf import init_from

            init_from(model, model.config.init_from)
        n_params = count_params(model)
        optimizer = build_optimizer(model, tc, cpu_adam=self.cuda and tc.offload_optimizer)
        gate = StepGate(optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(tc, self.world, self.cuda),
                                               dist_init_required=False)
        loader = self._loader("train")
        try:
            self._loader("val")
            self.has_val = True
        except ValueError as e:  # a corpus too small for a val split (data.val_fraction)
            self.has_val = False
            no_val = str(e)

        step, tokens_seen, skipped_total = 0, 0, 0
        if latest is not None:
            meta, rank_state = ckpt.load(engine, latest, rank=self.rank, world_size=self.world)
            step, tokens_seen, skipped_total = meta["step"], meta["tokens_seen"], meta.get("skipped_steps", 0)
            loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])

        monitor = Monitor(enabled=self.rank == 0, out_dir=self.out_dir, cfg=self.cfg, wandb_cfg=self.wandb_cfg,
                          total_steps=tc.steps, start_step=step, run_name=str(self.cfg.run.name))
        if not self.has_val:
            monitor.message(f"validation skipped: {no_val}")
        if latest is not None:
            monitor.message(f"resumed from {latest} (step {step}, {tokens_seen:,} tokens seen)")
        t_engine = time.perf_counter()
        monitor.message(
            f"train: {self.model_cfg.arch}, {n_params / 1e6:.2f}M params, ZeRO-{tc.zero_stage}, {tc.precision}, "
            f"{self.world} rank(s) on {'GPU' if self.cuda else 'CPU'}, {tc.steps} steps")

        sched = schedule_of(tc)
        tokens_per_step = tc.micro_batch_size * tc.grad_accum * self.world * self.seq_len
        flops_tok = float(flops_per_token(self.model_cfg, self.seq_len))
        peak = 0.0
        if self.rank == 0:
            peak, peak_src = device_peak_flops(tc.precision, configured_tflops=tc.peak_tflops)
            monitor.summary({"throughput/peak_flops_per_device": peak, "throughput/peak_source": peak_src,
                             "model/params": n_params, "model/flops_per_token": flops_tok})
        monitor.message(f"ready in {time.perf_counter() - T0:.1f}s (start-up {t_start - T0:.1f}s, model and "
                        f"engine {t_engine - t_start:.1f}s, MFU reference {time.perf_counter() - t_engine:.1f}s)")
        zero0 = engine.zero_optimization_stage() == 0
        params = [p for p in engine.module.parameters() if p.requires_grad]
        data = iter(loader)
        bad_in_row, first_bad = 0, None
        last_saved = step if latest is not None else -1
        val_loss: Optional[float] = None
        loss_value = float("nan")
        run_tokens, run_time = 0, 0.0  # this attempt, first step excluded (warm-up)
        first_step = step + 1
        timing = {"eval_s": 0.0, "ckpt_s": 0.0}
        t_first_done = None  # the loop's wall time is measured from the end of the first step
        exit_code = 0

        def save(at: int) -> None:
            nonlocal last_saved
            t = time.perf_counter()
            meta = {"step": at, "tokens_seen": tokens_seen, "skipped_steps": skipped_total, "world_size": self.world,
                    "zero_stage": tc.zero_stage, "precision": tc.precision, "time": time.time()}
            ckpt.save(engine, self.ckpt_root, at, rank=self.rank, keep=tc.keep_checkpoints, meta=meta,
                      rank_state={"rng": ckpt.rng_state(), "loader": loader.state_dict()})
            last_saved = at
            timing["ckpt_s"] += time.perf_counter() - t
            monitor.message(f"checkpoint: step {at} -> {self.ckpt_root / ckpt.name_of(at)}")
            if at in self.faults.get("kill_after_save", ()):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        engine.train()
        t_ready = time.perf_counter()
        while step < tc.steps:
            step += 1
            lr = sched(step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            # [sum of finite micro-batch losses, non-finite micro-batches, stop requested]
            local = torch.zeros(3, dtype=torch.float64, device=self.device)
            for micro in range(tc.grad_accum):
                batch = self._batch(next(data))
                loss = engine(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])
                if self.rank == 0 and step in self.faults.get("nan_loss", ()):
                    loss = loss * float("nan")
                lv = loss.detach().double()
                finite = torch.isfinite(lv)
                local[0] += torch.where(finite, lv, torch.zeros_like(lv))
                local[1] += (~finite).double()
                engine.backward(loss)
                if micro < tc.grad_accum - 1:
                    engine.step()
            local[2] = 1.0 if STOP["signal"] is not None else 0.0
            dist.all_reduce(local)
            nonfinite = bool(local[1] > 0)
            grad_norm = None
            if zero0:  # gradients are whole and averaged on every rank after the boundary backward
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
                nonfinite |= not math.isfinite(grad_norm)
            if nonfinite:
                gate.close()
            engine.step()
            gate.open()
            applied = not nonfinite and engine.was_step_applied()
            if not zero0:
                gn = engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            if step > first_step:
                run_tokens += tokens_per_step
                run_time += dt
            good = tc.grad_accum * self.world - float(local[1])
            loss_value = float(local[0]) / good if good > 0 else float("nan")
            if not applied:
                skipped_total += 1
                bad_in_row += 1
                first_bad = first_bad or step
                monitor.message(f"step {step}: non-finite loss or gradients (grad norm {grad_norm}); "
                                f"step skipped ({bad_in_row} in a row, {skipped_total} in all)")
                if bad_in_row >= tc.max_bad_steps:
                    raise NonFiniteError(
                        f"non-finite loss or gradients at step {step}: {bad_in_row} steps in a row "
                        f"(steps {first_bad}-{step}) reached train.max_bad_steps={tc.max_bad_steps}")
            else:
                bad_in_row, first_bad = 0, None
            tokens_per_s = tokens_per_step / dt
            metrics = {
                "train/loss": loss_value,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_seen": tokens_seen,
                "train/skipped_steps": skipped_total,
                "throughput/tokens_per_s": tokens_per_s,
                "throughput/step_time_s": dt,
                "throughput/mfu": flops_tok * tokens_per_s / (peak * self.world) if peak > 0 else 0.0,
            }
            if self.rank == 0:
                metrics.update(memory_metrics(self.cuda))
            if self.has_val and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
                t = time.perf_counter()
                val_loss = self.evaluate(engine)
                timing["eval_s"] += time.perf_counter() - t
                metrics["val/loss"] = val_loss
                monitor.message(f"step {step}: val/loss {val_loss:.4f}")
            monitor.log(step, metrics)
            monitor.progress(step, loss_value, tokens_per_s, log_every=tc.log_every, force=step == tc.steps)
            stop = bool(local[2] > 0)
            if (tc.save_every and step % tc.save_every == 0) or step == tc.steps or stop:
                save(step)
            if stop:
                name = signal.Signals(STOP["signal"]).name if STOP["signal"] else "a signal on another rank"
                monitor.message(f"stopped by {name} at step {step}; checkpoint saved; rerun to resume")
                exit_code = EXIT_STOPPED
                break
            if t_first_done is None:
                t_first_done = time.perf_counter()
                timing.update(eval_s=0.0, ckpt_s=0.0)

        if exit_code == 0 and last_saved != step:
            save(step)
        t_end = time.perf_counter()
        loop_steps = step - first_step  # steps after the first of this attempt
        if exit_code == 0:
            state = ckpt.gather_full_state(engine, rank=self.rank)
            if self.rank == 0:
                model_dir = ckpt.export_model(state, self.model_cfg, self.out_dir / "model")
                monitor.message(f"model: {model_dir}")
            dist.barrier()
        tps = run_tokens / run_time if run_time > 0 else 0.0
        result = {
            "step": step,
            "final_loss": loss_value,
            "val_loss": val_loss,
            "tokens_per_s": tps,
            "mfu": flops_tok * tps / (peak * self.world) if peak > 0 else 0.0,
            "tokens_seen": tokens_seen,
            "skipped_steps": skipped_total,
            "params": n_params,
            "ranks": self.world,
            "stopped": exit_code != 0,
            # wall time of this attempt's loop after its first step: steps, loader, logging, eval, saves
            "loop_s": (t_end - t_first_done) if t_first_done else 0.0,
            "loop_steps": loop_steps,
            **timing,
        }
        if self.rank == 0:
            from pipeline.stage import atomic_write_json

            atomic_write_json(self.out_dir / "result.json", result)
            monitor.summary({k: v for k, v in result.items() if v is not None})
            if exit_code and monitor.run is not None and hasattr(monitor.run, "mark_preempting"):
                monitor.run.mark_preempting()
        monitor.message(f"loop {t_end - t_ready:.1f}s, export {time.perf_counter() - t_end:.1f}s")
        monitor.finish(exit_code=0)
        return exit_code

    def evaluate(self, engine) -> float:
        """Mean validation loss over targets, all ranks; the same batches every time."""
        import torch
        import torch.distributed as dist

        from pipeline.train import checkpoint as ckpt

        rng = ckpt.rng_state()  # evaluation must not move the training RNG (exact resume)
        engine.eval()
        loader = self._loader("val")
        it = iter(loader.one_epoch())
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        n = 0
        with torch.no_grad():
            while self.tc.eval_batches == 0 or n < self.tc.eval_batches:
                batch = next(it, None)
                have = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank runs the same number (ZeRO-3)
                if have.item() < 1:
                    break
                batch = self._batch(batch)
                loss = engine(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])
                count = (batch["targets"] != -100).sum().double()
                total[0] += loss.double() * count
                total[1] += count
                n += 1
        dist.all_reduce(total)
        engine.train()
        ckpt.set_rng_state(rng)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


if __name__ == "__main__":
    sys.exit(main())
