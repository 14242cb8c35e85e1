"""Generation cost at batch 1: tokens/s and memory after prompts of growing length.

For each prompt length C: read a random prompt of C tokens in chunks of `prefill_chunk` tokens,
carrying the state between chunks (`model.forward_with_state`: the chunkwise mLSTM / sLSTM
recurrence for xLSTM, a growing KV cache for the Llama baseline), computing the logits of the last
position only (nothing else of the prompt is sampled from). Then decode: `repeats` rounds, and in each
round `gen_tokens` greedy steps (`model.step`) timed for every context, the contexts' order rotated and
reversed from round to round, so a slow spell of a shared machine, or a trend in its speed (clock,
cache, other jobs), lands on every context alike instead of on the longest ones. Each context's
decode speed is the median of its rounds, with the fastest and slowest round as its spread: a
difference between contexts smaller than that spread is noise, not a trend. xLSTM's state has a
fixed size, so its decode speed and memory stay flat in C; the baseline's KV cache grows linearly,
and so does its per-token attention work. (The states of all contexts are kept for the rounds; each
round adds gen_tokens to every context, which is small beside C.)

Memory: `state_bytes` is the exact size of the state after the prompt (recurrent states or KV
cache). `prefill_peak_bytes` is the weights plus the rise of memory in use while reading the prompt
(the state being built and the transients); `decode_peak_bytes` the weights, the state and the rise
during the first round's steps. The rise is measured on CUDA from torch.cuda.max_memory_allocated;
on CPU from the process's peak resident set (VmHWM, reset through /proc/self/clear_refs), which is
indicative only: the allocator may reuse memory it kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from xlp.pipeline.core.resources import config_dir
from xlp.pipeline.eval.common import param_bytes, tensor_bytes
from xlp.xlstm_model import ModelConfig, build_model
from xlp.xlstm_model.machine import cpu_name, peak_rss


class _Rise:
    """How far memory in use rose above where it was at reset() (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = int(torch.cuda.memory_allocated())
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = peak_rss()

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return max(0, int(torch.cuda.max_memory_allocated()) - self.base)
        return max(0, peak_rss() - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def round_orders(n: int, repeats: int) -> list[list[int]]:
    """The order of n contexts in each round: a rotation, then the same reversed, then the next rotation
    ..., so that each context is timed early and late, after shorter and after longer ones."""
    orders = []
    for r in range(repeats):
        order = [(i + r // 2) % n for i in range(n)]
        orders.append(order[::-1] if r % 2 else order)
    return orders


@torch.no_grad()
def generation_cost(model, *, contexts: list[int], gen_tokens: int, prefill_chunk: int, vocab_size: int,
                    device: torch.device, seed: int = 0, repeats: int = 5, log=print) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = param_bytes(model)
    rise = _Rise(device)
    low = min(4, vocab_size - 1)  # skip the specials <pad> <unk> <bos> <eos>
    # warm up kernels and the allocator on a short prompt so one-off costs are not timed
    warm = torch.randint(low, vocab_size, (1, min(64, max(contexts))), generator=g).to(device)
    _, st = model.forward_with_state(warm, last_only=True)
    for _ in range(3):
        _, st = model.step(warm[:, -1], st)
    del st
    rows, states, tokens = [], [], []
    for C in contexts:  # prefill, each context alone (its memory is measured alone)
        prompt = torch.randint(low, vocab_size, (1, C), generator=g).to(device)
        rise.reset()
        t0 = time.perf_counter()
        state = None
        for chunk in prompt.split(prefill_chunk, dim=1):
            logits, state = model.forward_with_state(chunk, state, last_only=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        prefill_peak = weights + rise.read()
        token = logits[:, -1].argmax(-1)
        for _ in range(2):  # untimed
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        rows.append({"context": C, "prefill_s": round(prefill_s, 4), "prefill_tokens_per_s": round(C / prefill_s, 1),
                     "state_bytes": int(tensor_bytes(state)), "prefill_peak_bytes": int(prefill_peak)})
        states.append(state)
        tokens.append(token)
        del prompt, logits
    samples: list[list[float]] = [[] for _ in contexts]  # ms per token of each round
    for r, order in enumerate(round_orders(len(contexts), repeats)):
        for i in order:
            token, state = tokens[i], states[i]
            if r == 0:
                rise.reset()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                logits, state = model.step(token, state)
                token = logits.argmax(-1)
            _sync(device)
            samples[i].append(1000 * (time.perf_counter() - t0) / gen_tokens)
            if r == 0:
                rows[i]["decode_peak_bytes"] = int(weights + rows[i]["state_bytes"] + rise.read())
            tokens[i], states[i] = token, state
    for row, ms in zip(rows, samples):
        median = statistics.median(ms)
        row.update({
            "decode_ms_per_token": round(median, 3),
            "decode_ms_per_token_min": round(min(ms), 3),
            "decode_ms_per_token_max": round(max(ms), 3),
            "decode_ms_per_token_rounds": [round(x, 3) for x in ms],
            "decode_tokens_per_s": round(1000 / median, 2),
            "decode_tokens_per_s_min": round(1000 / max(ms), 2),
            "decode_tokens_per_s_max": round(1000 / min(ms), 2),
        })
        log(f"eval generation: context {row['context']}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s (median of {len(ms)} rounds of {gen_tokens}; "
            f"{row['decode_tokens_per_s_min']:.1f}-{row['decode_tokens_per_s_max']:.1f}), state "
            f"{row['state_bytes'] / 2**20:.2f} MiB, decode peak {row['decode_peak_bytes'] / 2**20:.1f} MiB")
    del states
    return {"device": str(device), "batch_size": 1, "gen_tokens": gen_tokens, "repeats": repeats,
            "prefill_chunk": prefill_chunk, "weight_bytes": weights,
            "memory_source": "cuda.max_memory_allocated" if device.type == "cuda" else "weights + VmHWM rise",
            "results": rows}


def _model_from_config(name: str, vocab_size: int | None):
    """A randomly initialised model of configs/model/<name>.yaml (timing does not depend on training)."""
    path = config_dir() / "model" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    if vocab_size or not data.get("vocab_size"):
        data["vocab_size"] = vocab_size or 50304
    torch.manual_seed(0)
    return build_model(ModelConfig(**data))


def main(argv=None) -> int:
    """`python -m xlp.pipeline.eval.gencost --models xlstm_125m llama_125m`: the eval stage's generation-cost
    measurement on randomly initialised models of configs/model/, side by side (no run needed)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--models", nargs="+", default=["tiny", "tiny_llama"], help="configs/model/ names")
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--gen-tokens", type=int, default=64, help="timed decode steps per context per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds (contexts interleaved); median and spread shown")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    out = {}
    for name in a.models:
        model = _model_from_config(name, a.vocab_size).to(device).eval()
        if a.dtype == "bf16":
            model = model.to(torch.bfloat16)
        res = generation_cost(model, contexts=a.contexts, gen_tokens=a.gen_tokens, prefill_chunk=a.prefill_chunk,
                              vocab_size=model.config.vocab_size, device=device, repeats=a.repeats,
                              log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        out[name] = res
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mib = 2.0 ** 20

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} {torch.get_num_threads()} threads, {platform.node()}"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    print(f"\nmachine: {machine}\ncommand: python -m xlp.pipeline.eval.gencost {' '.join(argv or sys.argv[1:])}")
    print(f"{'model':16s} {'context':>8s} {'prefill tok/s':>14s} {'decode tok/s (min-max)':>24s} {'vs first':>9s} "
          f"{'state MiB':>10s} {'decode peak MiB':>16s}")
    for name, res in out.items():
        first = res["results"][0]["decode_ms_per_token"]
        for r in res["results"]:
            spread = f"{r['decode_tokens_per_s']:.1f} ({r['decode_tokens_per_s_min']:.1f}-{r['decode_tokens_per_s_max']:.1f})"
            print(f"{name:16s} {r['context']:8d} {r['prefill_tokens_per_s']:14.0f} {spread:>24s} "
                  f"{r['decode_ms_per_token'] / first:8.2f}x {r['state_bytes'] / mib:10.2f} {r['decode_peak_bytes'] / mib:16.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
