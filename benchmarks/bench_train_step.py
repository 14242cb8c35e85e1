"""One training step of whole models, eager and compiled: tokens/s, MFU and peak memory per GPU.

    python benchmarks/bench_train_step.py                                  # xlstm_large_400m vs llama_400m, 8x2048
    python benchmarks/bench_train_step.py --shape 2x8192 --modes eager,compiled
    python benchmarks/bench_train_step.py --models tiny_xlstm_large,tiny_llama --shape 2x64 --device cpu \\
        --compile-backend aot_eager --vocab-size 512                          # CPU dry run

A step is what a pretraining run does per micro-batch on one GPU: forward with the loss (our fused
linear + cross-entropy), backward, fused AdamW step, zero_grad; float32 weights and optimizer
states, bf16 autocast (--precision), random tokens, no document packing. `eager` runs the blocks as
PyTorch ops (our Triton kernels where they exist); `compiled` is train.compile: each block through
torch.compile (LanguageModel.compile_blocks, --checkpoint's policy inside the graph). Every model
(the first is the subject, the others its baselines) is measured in this one process, one after
another on the same GPU: eager rows first, so that a compile that runs out of time leaves them.

Per row: tokens/s and ms/step (median of --steps after --warmup steps; the warm-up includes the
compile), MFU = xlstm_model.flops_per_token x tokens/s / the GPU's dense bf16 peak
(xlp.xlstm_model.machine.GPU_PEAK_TFLOPS), peak memory (torch.cuda.max_memory_allocated; CPU: the rise
of the process's peak RSS), the first step's loss. Then a table with the ratios. Each row is also a
`RESULT {json}` line on stdout and, with --json PATH, a line of PATH (benchmarks/gpu_campaign.sh
reads those). Imports only torch, triton and this repository's xlstm_model and kernels.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from xlp.xlstm_model.config import load_model_yaml
from xlp.xlstm_model.counts import flops_per_token
from xlp.xlstm_model.lm import build_model
from xlp.xlstm_model.machine import cpu_name, gpu_peak_tflops, peak_rss, reset_peak_rss

MODES = ("eager", "compiled")
POLICIES = ("none", "full", "selective")


def machine(device: torch.device) -> str:
    import triton

    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"CPU {cpu_name()}, {torch.get_num_threads()} threads")
    return f"{where}, torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"


def parse_shape(text: str) -> tuple[int, int]:
    """'8x2048' -> (batch 8, sequence length 2048)."""
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        batch = seq = 0
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BATCHxSEQ_LEN, e.g. 8x2048")
    return batch, seq


def measure(name: str, mode: str, batch: int, seq: int, *, device: torch.device, precision: str, steps: int,
            warmup: int, policy: str, backend: str, vocab_size: int, overrides: list[str]) -> dict[str, Any]:
    """One row: build `name` fresh (seed 0), take warmup + steps training steps, measure them."""
    cfg = load_model_yaml(name, overrides)
    if cfg.vocab_size is None:
        cfg.vocab_size = vocab_size
    cfg.activation_checkpointing = policy != "none"
    if policy != "none":
        cfg.checkpoint_policy = policy
    torch._dynamo.reset()  # each row compiles for itself: no other model's graphs in the cache,
    gc.collect()  # and the earlier rows' models, which those graphs held, are freed before this one's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    if mode == "compiled":
        model.compile_blocks(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> torch.Tensor:
        with autocast:
            loss = model(inputs, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    t0 = time.perf_counter()
    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    sync()
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss() - base  # what this row added to the process's peak
    ms = 1e3 * statistics.median(times)
    tokens_per_s = batch * seq / (ms / 1e3)
    fpt = flops_per_token(cfg, seq)
    peak_tflops = gpu_peak_tflops(torch.cuda.get_device_name(device), precision == "bf16") if device.type == "cuda" else None
    mfu = fpt * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None
    n_params = sum(p.numel() for p in model.parameters())
    return {"bench": "train_step", "model": name, "arch": cfg.arch, "params": n_params, "mode": mode, "batch": batch, "seq_len": seq,
            "precision": precision, "checkpoint": policy, "backend": backend if mode == "compiled" else None,
            "tokens_per_s": tokens_per_s, "ms_per_step": ms, "ms_min": 1e3 * min(times), "mfu": mfu,
            "flops_per_token": fpt, "peak_gib": peak / 2**30, "setup_s": setup_s, "first_loss": first_loss,
            "loss_finite": math.isfinite(first_loss), "device": str(device)}


def print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['model']:>18} {r['mode']:>8} {r['batch']}x{r['seq_len']}: FAILED {r['error']}", flush=True)
        return
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
    print(f"{r['model']:>18} {r['mode']:>8} {r['batch']}x{r['seq_len']}: {r['tokens_per_s']:10,.0f} tok/s  "
          f"{r['ms_per_step']:9.2f} ms/step  MFU {mfu}  peak {r['peak_gib']:6.2f} GiB  "
          f"set-up {r['setup_s']:6.1f} s  first loss {r['first_loss']:.3f}", flush=True)


def ratio(a: Optional[dict], b: Optional[dict]) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"


def print_table(rows: list[dict[str, Any]], models: list[str], modes: list[str]) -> None:
    """Per shape: each model's tok/s per mode, compiled/eager, and subject/baseline per mode."""
    subject, baselines = models[0], models[1:]
    print("\n| shape | model | " + " | ".join(f"{m} tok/s" for m in modes) + " | peak GiB | MFU (best) |"
          + (" compiled/eager |" if len(modes) > 1 else ""))
    print("|---" * (4 + len(modes) + (len(modes) > 1)) + "|")
    by = {(r["model"], r["mode"], r["batch"], r["seq_len"]): r for r in rows}
    shapes = sorted({(r["batch"], r["seq_len"]) for r in rows}, key=lambda s: s[1])
    for batch, seq in shapes:
        for name in models:
            cells = [by.get((name, mode, batch, seq)) for mode in modes]
            ok = [c for c in cells if c and "error" not in c]
            tok = [f"{c['tokens_per_s']:,.0f}" if c and "error" not in c else ("FAILED" if c else "-") for c in cells]
            best = max(ok, key=lambda c: c["tokens_per_s"]) if ok else None
            peak = f"{best['peak_gib']:.1f}" if best else "-"
            mfu = f"{100 * best['mfu']:.1f}%" if best and best["mfu"] is not None else "-"
            line = f"| {batch}x{seq} | {name} | " + " | ".join(tok) + f" | {peak} | {mfu} |"
            if len(modes) > 1:
                line += f" {ratio(by.get((name, 'compiled', batch, seq)), by.get((name, 'eager', batch, seq)))} |"
            print(line)
        for base in baselines:
            for mode in modes:
                print(f"  {batch}x{seq} {mode}: {subject} / {base} = "
                      f"{ratio(by.get((subject, mode, batch, seq)), by.get((base, mode, batch, seq)))}")
            best = lambda name: max((r for r in rows if r["model"] == name and (r["batch"], r["seq_len"]) == (batch, seq)
                                     and "error" not in r), key=lambda r: r["tokens_per_s"], default=None)
            print(f"  {batch}x{seq} best of each: {subject} / {base} = {ratio(best(subject), best(base))}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_train_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="xlstm_large_400m,llama_400m",
                   help="configs/model names (or YAML paths), comma-separated: the subject, then its baselines")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="BxS",
                   help="batch x sequence length, repeatable (default 8x2048)")
    p.add_argument("--modes", default="eager,compiled", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compile happens in the first)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16: autocast (float32 weights)")
    p.add_argument("--checkpoint", default="none", choices=POLICIES,
                   help="activation checkpointing of every block (model.activation_checkpointing / checkpoint_policy)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--vocab-size", type=int, default=50304, help="for configs whose vocab_size is null")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides for every model")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    if not models or any(m not in MODES for m in modes) or not modes:
        p.error(f"--modes {args.modes!r}: expected some of {', '.join(MODES)}")
    shapes = args.shape or [(8, 2048)]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in models:  # a bad name or key fails now, not after minutes of measuring
        try:
            load_model_yaml(name, args.overrides)
        except (OSError, ValueError) as e:
            p.error(f"--models {name}: {e}")
    print(f"command: {shlex.join(['python', 'benchmarks/bench_train_step.py', *(sys.argv[1:] if argv is None else argv)])}")
    print(f"machine: {machine(device)}")
    print(f"models: {', '.join(models)}; shapes: {', '.join(f'{b}x{s}' for b, s in shapes)}; modes: {', '.join(modes)}; "
          f"{args.precision}{' autocast' if args.precision == 'bf16' else ''}, fused AdamW, checkpointing "
          f"{args.checkpoint}, compile backend {args.compile_backend}; median of {args.steps} steps after {args.warmup}",
          flush=True)
    rows = []
    for batch, seq in shapes:
        for mode in modes:  # eager rows first: a compile that runs out of time leaves them
            for name in models:
                try:
                    row = measure(name, mode, batch, seq, device=device, precision=args.precision, steps=args.steps,
                                  warmup=max(1, args.warmup), policy=args.checkpoint, backend=args.compile_backend,
                                  vocab_size=args.vocab_size, overrides=args.overrides)
                except Exception as e:  # noqa: BLE001 - one failing row (OOM, a compile error) must not lose the rest
                    traceback.print_exc()
                    row = {"bench": "train_step", "model": name, "mode": mode, "batch": batch, "seq_len": seq,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                gc.collect()  # the row's model and optimizer states go before the next is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["machine"] = machine(device)
                rows.append(row)
                print_row(row)
                print("RESULT " + json.dumps(row), flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print_table(rows, models, modes)
    return 1 if any("error" in r or not r.get("loss_finite", False) for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
