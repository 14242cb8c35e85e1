"""Generation cost at batch 1: tokens/s and peak memory after prompts of growing length.

For each prompt length C: read a random prompt of C tokens in chunks of `prefill_chunk` tokens,
carrying the state between chunks (`model.forward_with_state`: the chunkwise mLSTM / sLSTM
recurrence for xLSTM, a growing KV cache for the Llama baseline), then time `gen_tokens` greedy
decode steps (`model.step`) after two untimed ones. xLSTM's state has a fixed size, so its decode
speed and memory stay flat in C; the baseline's KV cache grows linearly, and so does its per-token
attention work.

Memory: `state_bytes` is the exact size of the state after the prompt (recurrent states or KV
cache). `*_peak_bytes` is the peak of memory in use during the phase: on CUDA
torch.cuda.max_memory_allocated (weights + state + transients); on CPU the model's weight bytes
plus the rise of the process's peak resident set (VmHWM, reset before the phase through
/proc/self/clear_refs), which is indicative only: the allocator may reuse memory it kept.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.eval.common import param_bytes, tensor_bytes
from xlstm_model.machine import peak_rss


class _Peak:
    """Peak memory of a phase (see the module docstring)."""

    def __init__(self, device: torch.device, weights: int):
        self.cuda = device.type == "cuda"
        self.weights = weights
        self.base = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = peak_rss()

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return self.weights + max(0, peak_rss() - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generation_cost(model, *, contexts: list[int], gen_tokens: int, prefill_chunk: int, vocab_size: int,
                    device: torch.device, seed: int = 0, log=print) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = param_bytes(model)
    peak = _Peak(device, weights)
    low = min(4, vocab_size - 1)  # skip the specials <pad> <unk> <bos> <eos>
    # warm up kernels and the allocator on a short prompt so one-off costs are not timed
    warm = torch.randint(low, vocab_size, (1, min(64, max(contexts))), generator=g).to(device)
    _, st = model.forward_with_state(warm)
    model.step(warm[:, -1], st)
    rows = []
    for C in contexts:
        prompt = torch.randint(low, vocab_size, (1, C), generator=g).to(device)
        peak.reset()
        t0 = time.perf_counter()
        state = None
        for chunk in prompt.split(prefill_chunk, dim=1):
            logits, state = model.forward_with_state(chunk, state)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        prefill_peak = peak.read()
        token = logits[:, -1].argmax(-1)
        del logits
        for _ in range(2):  # untimed
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        state_bytes = tensor_bytes(state)
        peak.reset()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        _sync(device)
        decode_s = time.perf_counter() - t0
        row = {
            "context": C,
            "prefill_s": round(prefill_s, 4),
            "prefill_tokens_per_s": round(C / prefill_s, 1),
            "decode_tokens_per_s": round(gen_tokens / decode_s, 2),
            "decode_ms_per_token": round(1000 * decode_s / gen_tokens, 3),
            "state_bytes": int(state_bytes),
            "prefill_peak_bytes": int(prefill_peak),
            "decode_peak_bytes": int(peak.read()),
        }
        rows.append(row)
        log(f"eval generation: context {C}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s, state {state_bytes / 2**20:.2f} MiB, decode peak "
            f"{row['decode_peak_bytes'] / 2**20:.1f} MiB")
        del state, prompt
    return {"device": str(device), "batch_size": 1, "gen_tokens": gen_tokens, "prefill_chunk": prefill_chunk,
            "weight_bytes": weights,
            "memory_source": "cuda.max_memory_allocated" if device.type == "cuda" else "weights + VmHWM rise",
            "results": rows}


def _model_from_config(name: str, vocab_size: int | None):
    """A randomly initialised model of configs/model/<name>.yaml (timing does not depend on training)."""
    import yaml

    from xlstm_model import ModelConfig, build_model

    path = Path(__file__).resolve().parent.parent.parent / "configs" / "model" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    if vocab_size or not data.get("vocab_size"):
        data["vocab_size"] = vocab_size or 50304
    torch.manual_seed(0)
    return build_model(ModelConfig(**data))


def main(argv=None) -> int:
    """`python -m pipeline.eval.gencost --models xlstm_125m llama_125m`: the eval stage's generation-cost
    measurement on randomly initialised models of configs/model/, side by side (no run needed)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--models", nargs="+", default=["tiny", "tiny_llama"], help="configs/model/ names")
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--gen-tokens", type=int, default=64)
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
                              vocab_size=model.config.vocab_size, device=device,
                              log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        out[name] = res
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mib = 2.0 ** 20
    print(f"\n{'model':16s} {'context':>8s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'state MiB':>10s} "
          f"{'decode peak MiB':>16s}")
    for name, res in out.items():
        for r in res["results"]:
            print(f"{name:16s} {r['context']:8d} {r['prefill_tokens_per_s']:14.0f} {r['decode_tokens_per_s']:13.1f} "
                  f"{r['state_bytes'] / mib:10.2f} {r['decode_peak_bytes'] / mib:16.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
