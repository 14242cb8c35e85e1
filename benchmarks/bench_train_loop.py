"""Benchmark: the train loop's own overhead against a bare forward/backward/step loop, on CPU.

    python benchmarks/bench_train_loop.py [--config configs/demo.yaml] [--steps 60] [key=value ...]

Times, for the same model, batch shape, thread count and optimizer settings, per optimizer step:
  1. bare torch:     model(x) -> backward -> clip -> AdamW.step -> zero_grad, batches pre-made in memory
  2. bare DeepSpeed: the same through a one-rank DeepSpeed engine (ZeRO stage of the config)
  3. our train loop: the real `python -m xlp.pipeline.train.main` rank (one rank, gloo) on synthetic shards:
                     loader, lr schedule, finiteness checks, all-reduce of the loss, metrics.jsonl, W&B
                     (offline unless wandb.mode is given), console lines, validation and checkpoints
                     (timed separately: they happen every train.eval_every / train.save_every steps)
and prints the loop's overhead: (3 minus eval and checkpoint time) against 1 and 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xlp.xlstm_model.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]


def synthetic_shards(out_dir: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    """Random documents as a shard-stage output (manifest.json + tar shards)."""
    import numpy as np

    from xlp.pipeline.data.shards import MANIFEST, ShardWriter, build_manifest, token_dtype

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    for split, n in (("train", tokens), ("val", max(tokens // 20, 20_000))):
        w = ShardWriter(out_dir, split, 0, dtype=dtype, sample_tokens=4096, shard_bytes=1 << 20)
        written = 0
        while written < n:
            doc = rng.integers(3, vocab, size=int(rng.integers(100, 2000)))
            doc[-1] = 2
            w.add_doc(doc, "synthetic")
            written += len(doc)
        w.close()
    manifest = build_manifest(out_dir, dtype=dtype, tokenizer_info={"vocab_size": vocab}, config={},
                              read_counts={}, per_source={})
    (out_dir / MANIFEST).write_text(json.dumps(manifest))


def bare_loops(cfg, shard_dir: Path, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """ms per optimizer step of the bare torch loop and the bare one-rank DeepSpeed loop."""
    import torch

    from xlp.pipeline.core.config import section
    from xlp.pipeline.train.optim import build_optimizer
    from xlp.xlstm_model import build_model

    torch.set_num_threads(threads)
    tc, mcfg = section(cfg, "train"), section(cfg, "model")
    seq, mbs = int(cfg.data.seq_len), tc.micro_batch_size
    # the batches the train loop gets (same documents, same document boundaries), read beforehand
    from xlp.pipeline.data.loader import ShardLoader

    loader = ShardLoader(shard_dir, split="train", seq_len=seq, batch_size=mbs, seed=int(cfg.run.seed))
    it = iter(loader)
    batches = []
    for _ in range((steps + warmup) * tc.grad_accum):
        b = next(it)
        batches.append((b["input_ids"], b["doc_starts"], b["targets"]))
    out = {}

    torch.manual_seed(0)
    model = build_model(mcfg)
    opt = build_optimizer(model, tc)

    def torch_step(i):
        for m in range(tc.grad_accum):
            x, ds, y = batches[(i * tc.grad_accum + m) % len(batches)]
            (model(x, doc_starts=ds, targets=y) / tc.grad_accum).backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["torch"] = _time(torch_step, steps, warmup)

    import deepspeed

    from xlp.pipeline.train import dist as xdist

    xdist.import_muon_without_compile()
    xdist.skip_shm_comm_build()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(xdist.free_port()))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = build_model(mcfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, tc),
                                           config=tc.deepspeed_config(1, False), dist_init_required=False)

    def ds_step(i):
        for m in range(tc.grad_accum):
            x, ds, y = batches[(i * tc.grad_accum + m) % len(batches)]
            engine.backward(engine(x, doc_starts=ds, targets=y))
            engine.step()

    out["deepspeed"] = _time(ds_step, steps, warmup)
    import torch.distributed as dist

    dist.destroy_process_group()
    return out


def _time(fn, steps: int, warmup: int) -> float:
    for i in range(warmup):
        fn(i)
    t = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_train_loop.py", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=60, help="timed steps of each loop (after warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.d_model=256")
    args = ap.parse_args(argv)
    os.environ.update(DS_ACCELERATOR="cpu")  # a CPU benchmark, GPUs or not (and train.device=cpu)

    from xlp.pipeline.core.config import load_config, to_yaml
    from xlp.pipeline.core.layout import RunLayout

    threads = args.threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="xlp-bench-") as tmp:
        run_dir = Path(tmp)
        layout = RunLayout(run_dir)
        overrides = [
            f"run.dir={run_dir}", "train.device=cpu", "train.cpu_processes=1", f"train.steps={args.steps + 1}",
            f"train.threads={threads}", "train.zero_stage=0", "wandb.mode=offline",
            *args.overrides,
        ]
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size is None:
            cfg = load_config(args.config, [*overrides, f"model.vocab_size={cfg.tokenizer.vocab_size}"])
        tc = cfg.train
        tokens_needed = (args.steps + args.warmup + 2) * tc.micro_batch_size * tc.grad_accum * (cfg.data.seq_len + 1)
        synthetic_shards(layout.shard_dir, int(cfg.model.vocab_size), tokens_needed)
        layout.config.write_text(to_yaml(cfg))

        import deepspeed
        import torch

        print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({threads} used), Python {platform.python_version()}, "
              f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")
        print(f"command: python benchmarks/bench_train_loop.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}")
        print(f"model: {cfg.model.arch} d_model={cfg.model.d_model} blocks={cfg.model.num_blocks} "
              f"vocab={cfg.model.vocab_size}; batch {tc.micro_batch_size}x{cfg.data.seq_len} tokens, "
              f"grad_accum {tc.grad_accum}, ZeRO-{tc.zero_stage}; {args.steps} timed steps")

        bare = bare_loops(cfg, layout.shard_dir, args.steps, args.warmup, threads)

        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        from xlp.pipeline.train.dist import free_port

        env["MASTER_PORT"] = str(free_port())
        proc = subprocess.run([sys.executable, "-m", "xlp.pipeline.train.main", "--run-dir", str(run_dir)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        res = json.loads(layout.train.result.read_text())
        steps = max(1, res["loop_steps"])
        loop_ms = res["loop_s"] / steps * 1e3
        extra_ms = (res["eval_s"] + res["ckpt_s"]) / steps * 1e3
        core_ms = loop_ms - extra_ms
        print(f"bare torch loop:      {bare['torch']:8.2f} ms/step")
        print(f"bare DeepSpeed loop:  {bare['deepspeed']:8.2f} ms/step")
        print(f"train loop (ours):    {core_ms:8.2f} ms/step over {steps} steps, plus validation and checkpoints "
              f"{extra_ms:.2f} ms/step amortised (eval {res['eval_s']:.2f}s, checkpoints {res['ckpt_s']:.2f}s)")
        print(f"loop overhead: {100 * (core_ms / bare['deepspeed'] - 1):+.1f}% vs bare DeepSpeed, "
              f"{100 * (core_ms / bare['torch'] - 1):+.1f}% vs bare torch "
              f"(with eval+checkpoints: {100 * (loop_ms / bare['deepspeed'] - 1):+.1f}% / "
              f"{100 * (loop_ms / bare['torch'] - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
