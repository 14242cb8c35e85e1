"""Benchmarks (not tests): `python benchmarks/bench_model.py [--steps N] [--quick]`.

1. CPU train-step throughput (tokens/s) of the tiny configs: xlstm_large vs the Llama baseline
   (and the NeurIPS xLSTM with its sLSTM block, for reference).
2. Peak memory of `mlstm_chunkwise` (forward + backward, reference backend) at S = 2k and 8k: it must
   grow linearly with S, i.e. x4 for a 4x longer sequence, not x16. For contrast, the O(S^2)
   parallel form at S = 1k and 2k. Memory is the rise of the peak resident set size (VmHWM, reset
   just before the op via /proc/self/clear_refs) of a fresh subprocess per measurement: large CPU
   tensors are mmap'ed by the allocator and returned on free, so RSS follows live tensor memory.
   (tracemalloc cannot see torch's C++ allocations.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from xlp.xlstm_model.machine import cpu_name, peak_rss, reset_peak_rss

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def machine_info() -> str:
    cpu = cpu_name()
    return (f"python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.machine()}, "
            f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")


def train_tokens_per_s(config: str, batch: int, seq_len: int, steps: int, vocab: int = 512) -> tuple[float, int]:
    from omegaconf import OmegaConf

    from xlp.xlstm_model import ModelConfig, build_model, count_params

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIGS / config)))
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, seq_len + 1))

    def step() -> None:
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return batch * seq_len * steps / dt, count_params(model)


def _memory_child(form: str, seq_len: int) -> None:
    """Run in a fresh process: print the peak RSS rise (bytes) of one forward + backward."""
    from xlp import kernels

    B, NH, DH = 1, 4, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, seq_len, DH, generator=g).requires_grad_() for _ in range(3))
    i, f = (torch.randn(B, NH, seq_len, generator=g).requires_grad_() for _ in range(2))
    # warm the allocator and kernels on a tiny problem so one-off costs do not count
    small = [x[:, :, :64].detach().clone().requires_grad_() for x in (q, k, v, i, f)]
    kernels.mlstm_chunkwise(*small, chunk_size=64, backend="reference").sum().backward()
    before = reset_peak_rss()
    t0 = time.perf_counter()
    if form == "chunkwise":
        h = kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=64, backend="reference")
    else:
        h = kernels.mlstm_parallel(q, k, v, i, f, backend="reference")
    h.sum().backward()
    dt = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"peak_rise": peak - before, "seconds": dt}))


def peak_memory(form: str, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_memory-child", form, str(seq_len)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_model.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--_memory-child", nargs=2, metavar=("FORM", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        _memory_child(args._memory_child[0], int(args._memory_child[1]))
        return

    print(f"# {machine_info()}")
    print(f"# command: {' '.join([Path(sys.executable).name, 'benchmarks/bench_model.py'] + sys.argv[1:])}")
    print("\n## mlstm_chunkwise peak memory, forward + backward (reference, fp32, B 1, NH 4, DQK = DV = 128, chunk 64)")
    results = {}
    for form, lengths in (("chunkwise", (2048, 8192)), ("parallel", (1024, 2048))):
        for S in lengths:
            r = peak_memory(form, S)
            results[(form, S)] = r["peak_rise"]
            print(f"{form:10s} S={S:5d}  peak +{r['peak_rise'] / 2**20:8.1f} MiB  ({r['seconds']:.2f} s)")
    ratio = results[("chunkwise", 8192)] / results[("chunkwise", 2048)]
    ratio_p = results[("parallel", 2048)] / results[("parallel", 1024)]
    print(f"chunkwise 8k / 2k = {ratio:.2f}x for 4x the tokens (linear: 4x; quadratic would be 16x)")
    print(f"parallel  2k / 1k = {ratio_p:.2f}x for 2x the tokens (quadratic: 4x)")

    print(f"\n## CPU train step (AdamW, fp32, batch {args.batch} x seq {args.seq_len}, vocab 512, "
          f"{args.steps} timed steps after 1 warm-up)")
    for config in ("tiny_xlstm_large.yaml", "tiny_llama.yaml", "tiny.yaml"):
        tps, n = train_tokens_per_s(config, args.batch, args.seq_len, args.steps)
        print(f"{config:24s} {n / 1e6:6.2f}M params  {tps:10.0f} tokens/s")


if __name__ == "__main__":
    main()
