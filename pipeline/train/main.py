"""One training rank: `python -m xlp.pipeline.train.main --run-dir RUN_DIR [--config FILE] [KEY=VALUE ...]`.

Runs under any launcher (see xlp.pipeline.train.dist): the train stage's own (`train.cpu_processes` gloo
ranks, or one rank per GPU), `torchrun`, `deepspeed`, `srun`, `mpirun`, Ray Train (`ray_train_loop`),
or none (one process). It reads the resolved config (default RUN_DIR/config.yaml, which the runner
writes) with the KEY=VALUE overrides given after it (a launcher passes its choices this way, e.g.
`train.device=cpu`), the tokenizer and shards of RUN_DIR, and writes RUN_DIR/train/: checkpoints/,
model/ (consolidated safetensors), metrics.jsonl, result.json, the W&B run, and this rank's heartbeat
(logs/heartbeat_<rank>.json, xlp.pipeline.train.heartbeat) for the launcher's hang check.

Exit status: 0 trained to train.steps; 143 stopped by SIGTERM/SIGINT after saving a checkpoint; 1 error
(the message is also in RUN_DIR/train/logs/rank_<r>.error).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from xlp.pipeline.core.config import load_run_config, section
from xlp.pipeline.core.layout import RunLayout, TrainLayout, check_train_paths
from xlp.pipeline.core.lock import RunLock
from xlp.pipeline.core.registry import STAGES, TRAIN
from xlp.pipeline.core.stage import STAGE_JSON, StageMarker, fingerprint, fingerprints, read_stage_json
from xlp.pipeline.train import dist as xdist
from xlp.pipeline.train.heartbeat import Heartbeat, beat_interval
from xlp.pipeline.train.hooks import load_hooks
from xlp.pipeline.train.stop import StopRequest
from xlp.pipeline.train.trainer import Trainer

T0 = time.perf_counter()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xlp.pipeline.train.main", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--config", type=Path, help="resolved config (default RUN_DIR/config.yaml)")
    ap.add_argument("--out-dir", type=Path, help="default RUN_DIR/train")
    ap.add_argument("--shard-dir", type=Path, help="default RUN_DIR/shard")
    ap.add_argument("--hooks", help="module:name of TrainHooks to install (xlp.pipeline.train.hooks; for tests)")
    ap.add_argument("--no-stage-json", dest="record_stage", action="store_false",
                    help="do not write OUT_DIR/stage.json (the train stage's launcher records it itself); by "
                    "default rank 0 records the run as `xlp run` would, so the runner treats it as its own")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.device=cpu")
    # the `deepspeed` launcher passes --local_rank (LOCAL_RANK is in the environment as well)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return run_rank(args.run_dir, config=args.config, out_dir=args.out_dir, shard_dir=args.shard_dir,
                    overrides=args.overrides, hooks=args.hooks, record_stage=args.record_stage)


def ray_train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer (which sets RANK, WORLD_SIZE, LOCAL_RANK and
    starts the process group):
        TorchTrainer(ray_train_loop, train_loop_config={"run_dir": "runs/demo"},
                     scaling_config=ScalingConfig(num_workers=8, use_gpu=True)).fit()
    Optional keys: config, out_dir, shard_dir, overrides (KEY=VALUE list), hooks, stop (a StopRequest),
    record_stage (default true: rank 0 writes OUT_DIR/stage.json as `xlp run` would).
    """
    code = run_rank(Path(config["run_dir"]), config=config.get("config"), out_dir=config.get("out_dir"),
                    shard_dir=config.get("shard_dir"), overrides=config.get("overrides") or (),
                    hooks=config.get("hooks"), stop=config.get("stop"),
                    record_stage=config.get("record_stage", True), exit_on_error=False)
    if code != 0:
        raise RuntimeError(f"training stopped early (exit status {code}); a checkpoint was saved")


def run_rank(run_dir: Path, *, config: Optional[Path] = None, out_dir: Optional[Path] = None,
             shard_dir: Optional[Path] = None, overrides: Sequence[str] = (), hooks: Optional[str] = None,
             stop: Optional[StopRequest] = None, record_stage: bool = True, exit_on_error: bool = True) -> int:
    """This process's rank of the job, to the end. Returns the exit status (0 or EXIT_STOPPED).
    record_stage: rank 0 writes OUT_DIR/stage.json (running, then done with the stage's metrics, or
    failed), so a run started directly (torchrun, srun, Ray Train) is one the runner knows."""
    layout = RunLayout(Path(run_dir))
    out = TrainLayout(Path(out_dir) if out_dir else layout.train_dir)
    stop = stop if stop is not None else StopRequest()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop.on_signal)
        signal.signal(signal.SIGINT, stop.on_signal)
    # DeepSpeed calls torch.distributed functions torch has deprecated: one warning per rank and call site
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    d = xdist.setup_env()
    out.rank_error(d.rank).unlink(missing_ok=True)

    import torch.distributed as dist

    own_group = not (dist.is_available() and dist.is_initialized())  # Ray Train starts its own
    marker = lock = heartbeat = None
    try:
        cfg = load_run_config(Path(config) if config else layout.config, list(overrides))  # checked whole
        # before anything is written: no checkpoints folder that a symlink takes to another run's
        check_train_paths(layout.root, out, cfg.train.checkpoint_dir, create=d.rank == 0)
        heartbeat = Heartbeat(out.heartbeat(d.rank), rank=d.rank,
                              interval_s=beat_interval(float(cfg.train.hang_timeout))).start()
        trajectory = None  # rank 0 decides which checkpoints are this run's
        if d.rank == 0:
            if record_stage:
                lock = RunLock(layout.root)  # as `xlp run` holds it: no second run interleaves with this one
                lock.acquire()
            upstream = upstream_fingerprints(cfg, layout)
            trajectory = fingerprint(TRAIN, cfg, upstream, trajectory=True)
            if record_stage:
                marker = direct_run_marker(cfg, layout, out, upstream)
        view = TRAIN.view(cfg)  # the ranks read only what the train stage declares (its fingerprint)
        cuda = start_process_group(view, d)
        trainer = Trainer(view, out=out, shard_dir=Path(shard_dir) if shard_dir else layout.shard_dir,
                          tokenizer_model=layout.tokenizer_model, env=d, cuda=cuda, hooks=load_hooks(hooks),
                          stop=stop, started_at=T0, stage_heartbeat=marker.beat if marker else None,
                          stale_dir=layout.stale_dir, heartbeat=heartbeat,
                          run_config=OmegaConf.to_container(cfg, resolve=True), trajectory=trajectory)
        code = trainer.run()
        if marker is not None:
            if code == 0:
                marker.done(json.loads(out.result.read_text()))
            else:
                marker.failed("interrupted (SIGTERM/SIGINT) after saving a checkpoint; rerun to resume")
        return code
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        if marker is not None:
            marker.failed(f"{type(e).__name__}: {e}")
        out.logs.mkdir(parents=True, exist_ok=True)
        out.rank_error(d.rank).write_text(f"{type(e).__name__}: {e}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        if not exit_on_error:
            own_group = False  # a peer may be blocked in a collective: leave the group to its owner
            raise
        # a peer may be blocked in a collective; the launcher ends it. Skip the group teardown.
        os._exit(1)
    finally:
        if heartbeat is not None:
            heartbeat.close()
        if lock is not None:
            lock.release()
        if own_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def upstream_fingerprints(cfg, layout: RunLayout) -> dict[str, str]:
    """The fingerprints of the stages training reads, as the runner computes them: the upstream stages'
    recorded ones (a compute node need not see the corpus their listings cover)."""
    markers = {dep: read_stage_json(layout.stage_dir(dep)) for dep in TRAIN.needs}
    if all(m.get("status") == "done" for m in markers.values()):
        return {dep: m["fingerprint"] for dep, m in markers.items()}
    return fingerprints(STAGES, cfg)  # upstream not done here (or never recorded): what the runner would compute


def direct_run_marker(cfg, layout: RunLayout, out: TrainLayout, upstream: dict[str, str]):
    """The train stage's stage.json for a run started without `xlp run`, with the fingerprint the runner
    computes from the same config over `upstream` (upstream_fingerprints)."""
    train = TRAIN
    return StageMarker(out.root / STAGE_JSON, "train", fingerprint=fingerprint(train, cfg, upstream),
                       trajectory=fingerprint(train, cfg, upstream, trajectory=True),
                       resumed=any(out.checkpoints.glob("step_*")))


def start_process_group(cfg, d: xdist.DistEnv) -> bool:
    """Threads, kernels and the process group of this rank as the config says. Returns whether the
    rank trains on a GPU."""
    import torch

    tc = section(cfg, "train")
    cuda = xdist.use_cuda(tc.device)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(tc.threads or max(1, len(os.sched_getaffinity(0)) // max(1, d.local_size)))
    section(cfg, "kernels").apply()  # the run's kernels.*, whatever this process's environment says

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    xdist.import_muon_without_compile()
    if not cuda:
        xdist.skip_shm_comm_build()
    else:
        torch.cuda.set_device(d.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return cuda


if __name__ == "__main__":
    sys.exit(main())
