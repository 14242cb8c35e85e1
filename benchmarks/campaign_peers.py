"""The GPU campaign's `peers` part: the official xLSTM code beside ours, in this one process on this one GPU.

    python benchmarks/campaign_peers.py [--json PATH] [--dry-run] [--peers mlstm_kernels,xlstm]

- mlstm_kernels: the official chunkwise kernels (`get_mlstm_kernel("chunkwise--triton_xl_chunk")` and
  `"chunkwise--triton_limit_chunk"`) against ours (xlp.kernels.triton.mlstm), forward+backward on the same
  inputs: 65,536 tokens per call at S=2048 and S=8192, NH=16, DQK=128, DV=256, bf16 (README, Performance).
  ours/peer = the peer's milliseconds over ours (above 1: ours is faster).
- xlstm: one training step (bf16 autocast, fused AdamW) of the official xLSTM-large
  (`xlstm.xlstm_large.model.xLSTMLarge`) at the sizes of our configs/model/xlstm_large_400m.yaml, beside
  ours (benchmarks/bench_train_step.py's step, eager and compiled) at B8xS2048.
  ours/peer = our tokens/s over the peer's.

Only their public API is called; nothing of theirs is copied here (their licence). A peer that cannot be
imported gives one row {"bench": "peer", "peer": NAME, "status": "not installed"} and nothing is timed for
it: the table prints "peer not installed". Rows go to stdout (`RESULT {json}`) and, with --json, to PATH.
--dry-run: on a CPU the official kernels cannot run: an importable peer gives "skipped (dry run on CPU)".
benchmarks/gpu_campaign.sh --peer-wheels DIR installs the peers from wheels (offline) first.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

PEERS = ("mlstm_kernels", "xlstm")
KERNELS = ("chunkwise--triton_xl_chunk", "chunkwise--triton_limit_chunk")
TOKENS, SEQLENS, NH, DQK, DV = 65536, (2048, 8192), 16, 128, 256
TRAIN_MODEL, TRAIN_SHAPE = "xlstm_large_400m", (8, 2048)


def emit(row: dict[str, Any], path: Optional[Path]) -> None:
    row = {"bench": "peer", **row}
    print("RESULT " + json.dumps(row), flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def importable(name: str) -> Optional[str]:
    """None when `name` imports; else why not."""
    try:
        importlib.import_module(name)
        return None
    except Exception as e:  # noqa: BLE001 - a broken install reads as not installed, with its error
        return f"{type(e).__name__}: {e}"


def best_ms(fn: Callable[[], Any], rounds: int = 2) -> float:
    import triton.testing

    return min(float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) for _ in range(rounds))


def kernels(path: Optional[Path]) -> None:
    import torch
    from mlstm_kernels.torch import get_mlstm_kernel

    from xlp.kernels.triton.mlstm import mlstm_chunkwise

    for S in SEQLENS:
        B = TOKENS // S
        g = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape, shift=0.0):
            return (torch.randn(*shape, device="cuda", generator=g) + shift).to(torch.bfloat16).requires_grad_(True)

        q, k, v = rand(B, NH, S, DQK), rand(B, NH, S, DQK), rand(B, NH, S, DV)
        i, f = rand(B, NH, S, shift=-2.0), rand(B, NH, S, shift=3.0)
        dh = torch.randn(B, NH, S, DV, device="cuda", dtype=torch.bfloat16)

        def ours():
            torch.autograd.backward(mlstm_chunkwise(q, k, v, i, f, chunk_size=64), dh)

        ours()
        for name in KERNELS:
            row = {"peer": "mlstm_kernels", "what": "mlstm chunkwise fwd+bwd", "kernel": name, "batch": B, "seq_len": S,
                   "nh": NH, "dqk": DQK, "dv": DV, "dtype": "bfloat16", "device": torch.cuda.get_device_name()}
            try:
                kernel = get_mlstm_kernel(name)

                def peer():
                    torch.autograd.backward(kernel(q=q, k=k, v=v, i=i, f=f, return_last_states=False), dh)

                peer()
                # interleaved: ours, the peer, ours again; our best of the two brackets the peer's time
                a = best_ms(ours)
                b = best_ms(peer)
                a = min(a, best_ms(ours))
                row.update(status="ok", ours_ms=a, peer_ms=b, ours_over_peer=b / a)
            except Exception as e:  # noqa: BLE001 - one kernel failing must not lose the other rows
                traceback.print_exc()
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
            emit(row, path)
        del q, k, v, i, f, dh
        torch.cuda.empty_cache()


def peer_train_row(batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """One training step of the official xLSTM-large, timed as bench_train_step times ours."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    from xlp.xlstm_model.config import load_model_yaml

    ours = load_model_yaml(TRAIN_MODEL, [])
    cfg = xLSTMLargeConfig(embedding_dim=ours.d_model, num_heads=ours.num_heads, num_blocks=ours.num_blocks,
                           vocab_size=ours.vocab_size, mode="train", chunkwise_kernel="chunkwise--triton_xl_chunk",
                           return_last_states=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = xLSTMLarge(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).cuda()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    first = float(step())
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    row = {"tokens_per_s": batch * seq / (ms / 1e3), "ms_per_step": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "first_loss": first, "params": sum(p.numel() for p in model.parameters())}
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def train_step(path: Optional[Path], steps: int, warmup: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train_step beside this script
    from bench_train_step import measure

    batch, seq = TRAIN_SHAPE
    base = {"peer": "xlstm", "what": "xLSTM-large training step", "model": TRAIN_MODEL, "batch": batch, "seq_len": seq,
            "device": torch.cuda.get_device_name()}
    try:
        theirs = peer_train_row(batch, seq, steps, warmup)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        emit({**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}, path)
        return
    for mode in ("eager", "compiled"):
        try:
            mine = measure(TRAIN_MODEL, mode, batch, seq, device=torch.device("cuda"), precision="bf16", steps=steps,
                           warmup=warmup, policy="none", backend="inductor", vocab_size=50304, overrides=[])
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit({**base, "mode": mode, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}, path)
            continue
        emit({**base, "mode": mode, "status": "ok", "ours_tokens_per_s": mine["tokens_per_s"],
              "peer_tokens_per_s": theirs["tokens_per_s"], "ours_over_peer": mine["tokens_per_s"] / theirs["tokens_per_s"],
              "ours_peak_gib": mine["peak_gib"], "peer_peak_gib": theirs["peak_gib"], "ours_params": mine["params"],
              "peer_params": theirs["params"], "ours_first_loss": mine["first_loss"], "peer_first_loss": theirs["first_loss"]},
             path)
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/campaign_peers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    p.add_argument("--dry-run", action="store_true", help="on a CPU: say which peers are importable, time nothing")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    peers = [x for x in a.peers.split(",") if x]
    if any(x not in PEERS for x in peers):
        p.error(f"--peers {a.peers!r}: expected some of {', '.join(PEERS)}")
    failed = False
    for peer in peers:
        why = importable(peer)
        if why is not None:
            print(f"{peer}: not installed ({why})", flush=True)
            emit({"peer": peer, "status": "not installed", "error": why[:300]}, a.json)
            continue
        if a.dry_run:
            emit({"peer": peer, "status": "skipped (dry run on CPU)"}, a.json)
            continue
        before = sum(1 for _ in open(a.json)) if a.json and a.json.is_file() else 0
        try:
            kernels(a.json) if peer == "mlstm_kernels" else train_step(a.json, a.steps, a.warmup)
        except Exception as e:  # noqa: BLE001 - the other peer still runs
            traceback.print_exc()
            emit({"peer": peer, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}, a.json)
        if a.json and a.json.is_file():
            rows = [json.loads(line) for line in a.json.read_text().splitlines()[before:]]
            failed |= any(r.get("status") == "failed" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
