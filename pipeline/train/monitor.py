"""What rank 0 reports: W&B (offline by default), RUN_DIR/train/metrics.jsonl, console lines, MFU.

Metric names follow torchtitan/OLMo: train/loss, train/lr, train/grad_norm, train/tokens_seen,
train/skipped_steps, throughput/tokens_per_s, throughput/mfu, memory/*, val/loss.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

import psutil
from tqdm import tqdm

from xlp.pipeline.core.secrets import redact
from xlp.xlstm_model.machine import GPU_PEAK_TFLOPS  # the table the benchmarks share


def device_peak_flops(precision: str, *, cuda: bool, configured_tflops: Optional[float] = None) -> tuple[float, str]:
    """Peak FLOP/s of one device (a GPU when `cuda`, else this process's CPU threads) and where the
    number came from (config, table, measured)."""
    if configured_tflops:
        return configured_tflops * 1e12, "config"
    if cuda:
        import torch

        name = torch.cuda.get_device_name()
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS:
            if key in name:
                return (bf16 if precision == "bf16" else fp32) * 1e12, f"table:{key}"
        return 0.0, f"unknown:{name}"
    return measure_cpu_flops(), "measured"


def measure_cpu_flops(n: int = 512, seconds: float = 0.2) -> float:
    """fp32 matmul FLOP/s on this process's threads: the CPU's achievable peak, for MFU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def memory_metrics(cuda: bool) -> dict[str, float]:
    gib = 1024**3
    out: dict[str, float] = {}
    if cuda:
        import torch

        out["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / gib
        out["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
    try:
        out["memory/rss_gib"] = psutil.Process().memory_info().rss / gib
    except ImportError:
        pass
    return out


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_metrics(path: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged twice (a resumed run) keeps its last record."""
    out: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        out.setdefault(rec["step"], {}).update(rec)
    return out


class Monitor:
    """Rank 0's reporter. Other ranks get a Monitor with enabled=False, which does nothing."""

    def __init__(self, *, enabled: bool, out_dir: Path, run_config: dict, wandb_cfg: Any, total_steps: int,
                 start_step: int, run_name: str):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.run = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        path = out_dir / "metrics.jsonl"
        if start_step > 0 and path.is_file():  # drop records past the checkpoint we resume from
            keep = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= start_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif start_step == 0 and path.is_file():
            path.unlink()
        self.jsonl = open(path, "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self.run = _init_wandb(out_dir, run_config, wandb_cfg, run_name)
        if sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                self._lost_wandb(e)

    def _lost_wandb(self, e: Exception) -> None:
        """W&B's service process is gone (a cluster's SIGTERM reaches every process of the job step,
        wandb-core included): go on without W&B, so the rank can still save its checkpoint."""
        print(f"W&B: {type(e).__name__}: {e}; logging to metrics.jsonl only from here", flush=True)
        self.run = None

    def progress(self, step: int, loss: float, tokens_per_s: float, *, force: bool = False,
                 log_every: int = 10, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(1, done) * (self.total_steps - step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s{extra}", refresh=False)
            self.bar.refresh()
            return
        if force or (log_every and step % log_every == 0):
            print(f"step {step}/{self.total_steps} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                  f"ETA {fmt_duration(eta)}{extra}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                for k, v in values.items():
                    self.run.summary[k] = v
            except Exception as e:  # noqa: BLE001
                self._lost_wandb(e)

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                self._lost_wandb(e)
            self.run = None


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _init_wandb(out_dir: Path, run_config: dict, wandb_cfg: Any, run_name: str):
    """The W&B run; a rerun of the stage continues the run whose id RUN_DIR/train/wandb_run_id holds."""
    import wandb

    id_file = out_dir / "wandb_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], a valid W&B run id
        id_file.write_text(run_id + "\n")
    wandb_dir = Path(wandb_cfg.dir) if wandb_cfg.dir else out_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # A W&B service inherited through the environment (WANDB_SERVICE, set by a process that used W&B
    # and then started us: a notebook, a test runner, the shell that submitted the job) is not ours: it
    # outlives a killed rank and keeps its run open, and the rerun's wandb.init then fails with "run ID
    # ... is in use". The rank starts its own.
    os.environ.pop("WANDB_SERVICE", None)
    return wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group,
        tags=list(wandb_cfg.tags or []),
        name=wandb_cfg.name or run_name,
        notes=wandb_cfg.notes,
        config=redact(run_config),  # no credentials in W&B
        id=run_id,
        resume="allow",
        mode=wandb_cfg.mode,
        dir=str(wandb_dir),
        settings=wandb.Settings(console="off", silent=True),
    )
