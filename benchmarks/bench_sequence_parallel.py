"""Benchmark (not a test): sequence parallelism on CPU ranks (gloo) or GPUs (NCCL), one run, every ratio from it.

    python benchmarks/bench_sequence_parallel.py [--seq 4096 16384 32768 65536] [--sp 1 2] [--steps 2]
    python benchmarks/bench_sequence_parallel.py --device cuda --seq 32768 8192 --json OUT.jsonl  # >= 2 GPUs

For each S and train.sequence_parallel N, N fresh processes (gloo over a file) each build the demo
xLSTM-large model (configs/model/tiny_xlstm_large.yaml, reference kernels, fp32) and run forward +
backward on their S/N tokens of one row, the mLSTM state passed between them
(xlp.xlstm_model.sequence_parallel). Per rank it reports:
- peak activation memory: the rise of the peak resident set size (VmHWM, reset just before the first
  step via /proc/self/clear_refs) over the resident size after the model is built, the largest over
  ranks. The ranks run with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so that freed tensors go back to
  the system (glibc otherwise raises the threshold after the first large free and keeps them);
- bytes this rank sends per step (its all-gather inputs and backward all-reduces): independent of S;
- tokens/s of the group: S / the slowest rank's step time (after one warm-up step).
On a machine with fewer cores than ranks x threads the ranks share cores: tokens/s then measures the
overhead of the split, not a speed-up (it prints the cores it has).

--device cuda: rank r drives cuda:r (NCCL, the Triton kernels, fp32); peak activation memory is the rise of
torch.cuda.max_memory_allocated over the allocation after the model is built. --json PATH appends each
row (`"bench": "seqpar"`) as it is measured (benchmarks/gpu_campaign.sh's seqpar part; campaign_table.py).
Needs only torch (and triton on GPUs): the model's size is read without OmegaConf.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny_xlstm_large.yaml"
VOCAB = 512


def _rank(rank: int, size: int, init: str, out: str, seq_len: int, steps: int, threads: int,
          device_type: str = "cpu") -> None:
    import torch.distributed as dist

    from xlp.xlstm_model import build_model
    from xlp.xlstm_model.config import load_model_yaml
    from xlp.xlstm_model.machine import peak_rss, reset_peak_rss
    from xlp.xlstm_model.sequence_parallel import SeqParallel

    torch.set_num_threads(threads)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    sent = [0]
    real_gather, real_reduce = dist.all_gather, dist.all_reduce

    def counted_gather(parts, x, **kw):
        sent[0] += x.numel() * x.element_size()
        return real_gather(parts, x, **kw)

    def counted_reduce(x, **kw):
        sent[0] += x.numel() * x.element_size()
        return real_reduce(x, **kw)

    cfg = load_model_yaml(CONFIG, [f"vocab_size={VOCAB}"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    sp = SeqParallel(None, rank, size)
    model.set_sequence_parallel(sp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, seq_len + 1), generator=g)
    inputs, targets = sp.take(ids[:, :-1]).to(device), sp.take(ids[:, 1:]).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> None:
        loss = model(inputs, targets=targets) * size  # the trainer's row share: equal slices, no ignored targets
        loss.backward()
        model.zero_grad(set_to_none=True)

    sync()
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    dist.all_gather, dist.all_reduce = counted_gather, counted_reduce
    step()  # memory and bytes: the first step (on GPUs also the kernels' compiles); time: the steps after it
    sync()
    peak = (torch.cuda.max_memory_allocated(device) if cuda else peak_rss()) - base
    dist.all_gather, dist.all_reduce = real_gather, real_reduce
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"peak_bytes": peak, "sent_bytes": sent[0], "seconds": seconds}))
    dist.barrier()
    dist.destroy_process_group()


def measure(seq_len: int, size: int, steps: int, threads: int, device: str = "cpu") -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(size, str(Path(tmp) / "init"), tmp, seq_len, steps, threads, device),
                           nprocs=size, join=True, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(size)]
    seconds = max(r["seconds"] for r in ranks)
    return {"S": seq_len, "sp": size, "peak_mib": max(r["peak_bytes"] for r in ranks) / 2**20,
            "sent_kib": max(r["sent_bytes"] for r in ranks) / 2**10, "tokens_per_s": seq_len / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: rank r on cuda:r, NCCL, Triton kernels (needs as many GPUs as the largest --sp)")
    ap.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # the ranks inherit it (see the docstring)
    from xlp.xlstm_model.machine import cpu_name

    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < max(args.sp):
        sys.exit(f"--device cuda --sp {max(args.sp)}: needs {max(args.sp)} GPUs, found {torch.cuda.device_count()}")
    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, NCCL, Triton kernels" if cuda
             else f"reference kernels, {args.threads} thread(s) a rank")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}; model {CONFIG.name}, fp32, {where}")
    rows = []
    print(f"{'S':>7} {'sp':>3} {'peak act MiB/rank':>18} {'vs sp=1':>8} {'sent KiB/rank/step':>19} {'tokens/s':>9}")
    for S in args.seq:
        base = None
        for size in args.sp:
            r = measure(S, size, args.steps, args.threads, args.device)
            base = r["peak_mib"] if size == 1 else base
            ratio = f"{r['peak_mib'] / base:.2f}x" if base else "-"
            print(f"{S:>7} {size:>3} {r['peak_mib']:>18.1f} {ratio:>8} {r['sent_kib']:>19.1f} "
                  f"{r['tokens_per_s']:>9.0f}", flush=True)
            rows.append(r)
            if args.json:  # row by row: a campaign part that runs out of time keeps what it measured
                with open(args.json, "a") as f:
                    f.write(json.dumps({"bench": "seqpar", "status": "ok", "device": args.device, **r}) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
