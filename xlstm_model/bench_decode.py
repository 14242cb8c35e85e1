"""Batch-1 decode speed after long prompts: tokens/s and memory at 1k, 4k and 16k tokens of context.

    python -m xlstm_model.bench_decode --model xlstm_large_400m                # GPU: bf16, CUDA graph
    python -m xlstm_model.bench_decode --model tiny_xlstm_large --device cpu   # CPU check
    python -m xlstm_model.bench_decode --model xlstm_large_400m --no-graph     # eager baseline

Random weights (speed does not depend on them). The prompt is read in segments carrying the state
(xlstm_model.decode.prefill); then --new-tokens greedy steps are timed, each ending in a host sync
(the token is read back, as a streaming generator does). xLSTM's state has a fixed size, so the time
per token should not depend on the context length.
"""
from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from xlstm_model.config import ModelConfig
from xlstm_model.decode import StepDecoder, graphs_wanted, prefill
from xlstm_model.lm import as_model_config, build_model

REPO = Path(__file__).resolve().parents[1]


def model_config(name: str, overrides: list[str], vocab_size: int) -> ModelConfig:
    from omegaconf import OmegaConf

    path = Path(name)
    if not path.is_file():
        path = REPO / "configs" / "model" / f"{name}.yaml"
    base = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path),
                           OmegaConf.from_dotlist(overrides))
    cfg = as_model_config(base)
    if cfg.vocab_size is None:
        cfg.vocab_size = vocab_size
    return cfg


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def memory_mb(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB peak allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB peak RSS"


def state_mb(state) -> float:
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() * t.element_size() for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)) / 2**20


@torch.no_grad()
def bench_contexts(model, contexts: list[int], new_tokens: int, device, use_graph, warmup: int,
                   rounds: int = 8) -> list[dict]:
    """Prefill each context, then time greedy steps round-robin over the contexts (rounds x
    new_tokens/rounds steps each), so a noisy machine slows every context alike."""
    rows, decoders, tokens = [], [], []
    for ctx in contexts:
        gen = torch.Generator(device="cpu").manual_seed(ctx)
        ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        logits, state = prefill(model, ids)
        token = logits.argmax(-1)
        token.item()
        prefill_s = time.perf_counter() - t0
        decoder = StepDecoder(model, state, 1, use_graph=use_graph)
        for _ in range(warmup):
            token = decoder.step(token).argmax(-1)
            token.item()
        rows.append({"ctx": ctx, "prefill_s": prefill_s, "memory": memory_mb(device), "state_mb": state_mb(state),
                     "graph": decoder.graph is not None, "times": []})
        decoders.append(decoder)
        tokens.append(token)
        del ids, logits
    per_round = max(1, new_tokens // rounds)
    for _ in range(rounds):
        for j, decoder in enumerate(decoders):
            token = tokens[j]
            for _ in range(per_round):
                t0 = time.perf_counter()
                token = decoder.step(token).argmax(-1)
                token.item()  # host sync per token, as when streaming
                rows[j]["times"].append(time.perf_counter() - t0)
            tokens[j] = token
    for r in rows:
        times = sorted(r.pop("times"))
        r["ms_per_token"] = 1e3 * sum(times) / len(times)
        r["median_ms"] = 1e3 * times[len(times) // 2]
        r["tokens_per_s"] = len(times) / sum(times)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xlstm_large_400m", help="configs/model/NAME.yaml or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    p.add_argument("--no-graph", action="store_true", help="eager steps (no CUDA graph)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.model, args.overrides, args.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    model = model.to(getattr(torch, dtype)).eval()
    use_graph = False if args.no_graph else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"command: {shlex.join([sys.executable, '-m', 'xlstm_model.bench_decode', *(argv or sys.argv[1:])])}")
    print(f"machine: {machine(device)}")
    print(f"model: {args.model} arch={cfg.arch} d_model={cfg.d_model} blocks={cfg.num_blocks} "
          f"params={n_params / 1e6:.1f}M dtype={dtype} cuda_graph={graphs_wanted(device, use_graph)}")
    rows = bench_contexts(model, [int(c) for c in args.contexts.split(",")], args.new_tokens, device, use_graph,
                          args.warmup)
    for r in rows:
        print(f"context {r['ctx']:>6}: {r['tokens_per_s']:8.1f} tokens/s  {r['ms_per_token']:7.3f} ms/token (median {r['median_ms']:.3f})  "
              f"prefill {r['prefill_s']:.2f}s  state {r['state_mb']:.2f} MiB  {r['memory']}  graph={r['graph']}",
              flush=True)
    if len(rows) > 1:
        print(f"ms/token at {rows[-1]['ctx']} vs {rows[0]['ctx']}: {rows[-1]['ms_per_token'] / rows[0]['ms_per_token']:.3f}x mean, "
              f"{rows[-1]['median_ms'] / rows[0]['median_ms']:.3f}x median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
