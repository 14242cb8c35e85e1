"""Peak host memory per rank when training starts from a transformers xLSTM checkpoint (model.init_from):
ZeRO-3's partitioned load against the naive whole-model load.

    python benchmarks/bench_init_load.py                         # d 1024 x 12 blocks, vocab 50304 (~0.2B), 2 ranks
    python benchmarks/bench_init_load.py --d-model 2048 --blocks 24 --ranks 4 --dir /tmp/ckpt   # ~1.4B, kept

It writes a checkpoint of the given shape (random weights, our --format hf writer: config.json + one
model.safetensors; kept in --dir when given, reused when --dir already holds one), then for each mode
starts --ranks gloo ranks on this machine (one process each, CPU) that do only the load:
  naive: every rank builds the whole fp32 model and loads the whole checkpoint into it (what ZeRO 0-2 need,
         and what ZeRO-3 did before), DeepSpeed partitioning it only afterwards;
  zero3: pipeline/train/zero_load.build_partitioned, as the train stage does under train.zero_stage=3: the
         model built inside deepspeed.zero.Init, each rank reading only its partition of every tensor.
Each rank reports its peak RSS (VmHWM: resident memory, memory-mapped file pages it touched included) and
its RSS before the load (Python, torch and DeepSpeed imported, the process group up); the load's own cost is
the difference. A table per mode, the checkpoint's size beside it, and the machine and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024 ** 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(args: argparse.Namespace) -> None:
    """One rank: the process group, then the load of --mode; prints a RESULT line."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import torch

    from xlp.pipeline.train import dist as xdist
    from xlp.xlstm_model.hf import CheckpointReader, init_from
    from xlp.xlstm_model.lm import build_model
    from xlp.xlstm_model.machine import peak_rss

    torch.set_num_threads(1)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    xdist.import_muon_without_compile()
    xdist.skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    import torch.distributed as dist

    spec = f"hf:{args.dir}"
    cfg = CheckpointReader(spec).config
    cfg.init_from = spec
    dist.barrier()
    before, t0 = peak_rss(), time.perf_counter()
    if args.mode == "naive":
        model = build_model(cfg)
        init_from(model, spec)
    else:
        from xlp.pipeline.train.zero_load import build_partitioned

        ds_config = {"train_batch_size": args.ranks, "train_micro_batch_size_per_gpu": 1,
                     "zero_optimization": {"stage": 3}}
        model = build_partitioned(cfg, ds_config)
    seconds = time.perf_counter() - t0
    kept = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
               for p in model.parameters())
    dist.barrier()
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "mode": args.mode, "rss_before": before,
                                  "peak_rss": peak_rss(), "kept_bytes": kept, "seconds": seconds}), flush=True)
    dist.barrier()


def write_checkpoint(args: argparse.Namespace) -> int:
    """The checkpoint of the shape asked for (reused when --dir holds one): its size in bytes."""
    import torch

    from xlp.xlstm_model import hf
    from xlp.xlstm_model.config import ModelConfig
    from xlp.xlstm_model.lm import build_model

    out = Path(args.dir)
    if not (out / "model.safetensors").is_file():
        cfg = ModelConfig(arch="xlstm_large", vocab_size=args.vocab_size, d_model=args.d_model,
                          num_blocks=args.blocks, num_heads=args.heads, tie_weights=False, norm_eps=1e-6)
        torch.manual_seed(0)
        hf.save_hf(build_model(cfg), cfg, out)
    return (out / "model.safetensors").stat().st_size


def run_mode(args: argparse.Namespace, mode: str) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(args.ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks),
                   LOCAL_WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-of", mode, "--dir", str(args.dir),
                                       "--ranks", str(args.ranks)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise SystemExit(f"{mode}: a rank failed (exit {p.returncode}):\n{err[-3000:]}")
        rows += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--modes", default="zero3,naive", help="comma-separated: zero3, naive")
    ap.add_argument("--dir", default=None, help="the checkpoint's folder (kept; default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)  # internal: run one rank of this mode
    args = ap.parse_args()
    if args.rank_of:
        args.mode = args.rank_of
        rank_main(args)
        return
    import tempfile

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_init_load-")
        args.dir = str(Path(tmp.name) / "ckpt")
    size = write_checkpoint(args)

    from xlp.xlstm_model.machine import cpu_name

    import torch

    print(f"machine: CPU {cpu_name()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"checkpoint: xlstm_large d {args.d_model} x {args.blocks} blocks, vocab {args.vocab_size}: "
          f"{size / GiB:.2f} GiB fp32 (one model.safetensors); {args.ranks} gloo ranks")
    print(f"{'mode':<6} {'rank':>4} {'before GiB':>10} {'peak GiB':>9} {'load GiB':>9} {'kept GiB':>9} "
          f"{'load/model':>10} {'s':>6}")
    for mode in args.modes.split(","):
        for r in run_mode(args, mode):
            load = r["peak_rss"] - r["rss_before"]
            print(f"{mode:<6} {r['rank']:>4} {r['rss_before'] / GiB:>10.2f} {r['peak_rss'] / GiB:>9.2f} "
                  f"{load / GiB:>9.2f} {r['kept_bytes'] / GiB:>9.2f} {load / size:>10.2f} {r['seconds']:>6.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
