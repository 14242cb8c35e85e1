"""Batch-1 decode speed after long prompts: tokens/s and memory at 1k, 4k and 16k tokens of context.

    python -m xlstm_model.bench_decode --model xlstm_large_400m                # GPU: bf16, compiled step in a CUDA graph
    python -m xlstm_model.bench_decode --model xlstm_large_400m --no-compile   # GPU: eager ops in a CUDA graph
    python -m xlstm_model.bench_decode --model xlstm_large_400m --fused        # GPU: hand-fused step in a CUDA graph
    XLP_DECODE_PDL=1 python -m xlstm_model.bench_decode --fused               # ... kernels overlapped (Hopper PDL)
    python -m xlstm_model.bench_decode --model xlstm_large_400m --no-graph --no-compile   # eager baseline
    python -m xlstm_model.bench_decode --model tiny_xlstm_large --device cpu   # CPU check

Random weights (speed does not depend on them). The prompt is read in segments carrying the state
(xlstm_model.decode.prefill); then --new-tokens greedy steps are timed (StepDecoder.step_greedy: the
argmax is taken on the device in the step's graph, as greedy generation does), each ending in a host
sync (the token is read back, as a streaming generator does). Then the same number of tokens as
`xlp generate --temperature 0` produces them ("run-ahead": StepDecoder.greedy_tokens, the device
up to 4 steps ahead of the host, each token read back as soon as it is there). Every row also says
whether the greedy paths pick the same 8 tokens as the argmax of the plain step. xLSTM's state has a
fixed size, so the time per token should not depend on the context length.
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
from xlstm_model.decode import StepDecoder, compile_wanted, decode_compile_options, graphs_wanted, prefill
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
def print_profile(decoder, token, device, steps: int = 20) -> None:
    """Kernels of `steps` decode steps, by total device time (what a step spends its time on)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            token = decoder.step_greedy(token)
            token.item()
    events = prof.key_averages()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=70))
    if device.type == "cuda":
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        n = sum(e.count for e in kernels)
        t = sum(e.device_time_total for e in kernels)
        print(f"profile: {n / steps:.0f} kernels per step, {t / steps / 1e3:.3f} ms of kernel time per step")


def greedy_agreement(decoder, token, n: int = 8) -> str:
    """Whether the greedy paths (step + argmax in one graph, and the run-ahead loop) pick the tokens
    that the plain step's logits do, from the same state; the state is put back afterwards."""
    saved = decoder.snapshot()
    plain, t = [], token
    for _ in range(n):
        t = decoder.step(t).argmax(-1)
        plain.append(t.item())
    decoder.restore(saved)
    greedy, t = [], token
    for _ in range(n):
        t = decoder.step_greedy(t)
        greedy.append(t.item())
    decoder.restore(saved)
    ahead = [t.item() for t in decoder.greedy_tokens(token, n)]
    decoder.restore(saved)
    same = lambda got: sum(a == b for a, b in zip(got, plain))
    return f"greedy tokens = step+argmax: graph {same(greedy)}/{n}, run-ahead {same(ahead)}/{n}"


def print_row(r: dict) -> None:
    print(f"context {r['ctx']:>6}: {r['tokens_per_s']:8.1f} tokens/s  {r['ms_per_token']:7.3f} ms/token (median {r['median_ms']:.3f})  "
          f"prefill {r['prefill_s']:.2f}s  setup {r['setup_s']:.1f}s  state {r['state_mb']:.2f} MiB  {r['memory']}  "
          f"graph={r['graph']} compiled={r['compiled']} fused={r['fused']}  vs eager step: max|dlogit| {r['max_abs_diff']:.3g} "
          f"same argmax {r['same_argmax']}; {r['agreement']}", flush=True)


@torch.no_grad()
def bench_contexts(model, contexts: list[int], new_tokens: int, device, use_graph, warmup: int,
                   rounds: int = 8, use_compile=None, profile: bool = False, use_fused=None) -> list[dict]:
    """Prefill each context, then time greedy steps round-robin over the contexts (rounds x
    new_tokens/rounds steps each), so a noisy machine slows every context alike; then the run-ahead
    generation of new_tokens per context. The decoder's first logits are compared with the plain
    eager `model.step` on the same state (max_abs_diff), and its greedy tokens with the argmax of its
    plain step. Each row is printed as soon as it is measured."""
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
        expected, _ = model.step(token, [tuple(t.clone() for t in s) for s in state])
        t0 = time.perf_counter()
        decoder = StepDecoder(model, state, 1, use_graph=use_graph, use_compile=use_compile, use_fused=use_fused)
        got = decoder.step(token).float()
        diff = (got - expected.float()).abs().max().item()
        same_argmax = bool(got.argmax(-1).eq(expected.argmax(-1)).all())
        token = decoder.step_greedy(token)  # its graph (step + argmax) is captured on first use
        token.item()
        setup_s = time.perf_counter() - t0
        del expected, got
        agreement = greedy_agreement(decoder, token)
        for _ in range(warmup):
            token = decoder.step_greedy(token)
            token.item()
        rows.append({"ctx": ctx, "prefill_s": prefill_s, "setup_s": setup_s, "max_abs_diff": diff,
                     "same_argmax": same_argmax, "memory": memory_mb(device), "state_mb": state_mb(state),
                     "graph": decoder.use_graph, "compiled": decoder.compiled, "fused": decoder.fused,
                     "agreement": agreement, "times": []})
        decoders.append(decoder)
        tokens.append(token)
        del ids, logits
    per_round = max(1, new_tokens // rounds)
    for _ in range(rounds):
        for j, decoder in enumerate(decoders):
            token = tokens[j]
            for _ in range(per_round):
                t0 = time.perf_counter()
                token = decoder.step_greedy(token)
                token.item()  # host sync per token, as when streaming
                rows[j]["times"].append(time.perf_counter() - t0)
            tokens[j] = token
    for r in rows:
        times = sorted(r.pop("times"))
        r["ms_per_token"] = 1e3 * sum(times) / len(times)
        r["median_ms"] = 1e3 * times[len(times) // 2]
        r["tokens_per_s"] = len(times) / sum(times)
        print_row(r)
    if len(rows) > 1:
        print(f"ms/token at {rows[-1]['ctx']} vs {rows[0]['ctx']}: {rows[-1]['ms_per_token'] / rows[0]['ms_per_token']:.3f}x mean, "
              f"{rows[-1]['median_ms'] / rows[0]['median_ms']:.3f}x median", flush=True)
    if profile:
        print_profile(decoders[0], tokens[0], device)
    # Greedy generation as xlp generate runs it: the device runs ahead of the host (greedy_tokens).
    for j, decoder in enumerate(decoders):
        t0 = time.perf_counter()
        for token in decoder.greedy_tokens(tokens[j], new_tokens):
            token.item()
        rows[j]["run_ahead_tps"] = new_tokens / (time.perf_counter() - t0)
        print(f"context {rows[j]['ctx']:>6}: run-ahead (xlp generate --temperature 0) {rows[j]['run_ahead_tps']:8.1f} "
              f"tokens/s  {1e3 / rows[j]['run_ahead_tps']:7.3f} ms/token", flush=True)
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
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the step (CUDA default: compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the step on CPU too")
    p.add_argument("--fused", action="store_true", help="xlstm_large: the hand-fused step kernels (no compile)")
    p.add_argument("--profile", action="store_true", help="print the kernels of 20 decode steps")
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
    use_compile = False if args.no_compile else (True if args.compile else None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"command: {shlex.join([sys.executable, '-m', 'xlstm_model.bench_decode', *(argv or sys.argv[1:])])}")
    print(f"machine: {machine(device)}")
    if compile_wanted(device, use_compile) and not args.fused:
        print("compile options (XLP_DECODE_COMPILE_MODE, XLP_DECODE_MATVEC, XLP_DECODE_TUNE): mode=%s "
              "matvec_as_reduction=%s coordinate_descent_tuning=%s" % decode_compile_options())
    if args.fused and device.type == "cuda":
        from kernels.triton.decode import pdl_wanted

        print(f"fused step: programmatic dependent launch (XLP_DECODE_PDL) {'on' if pdl_wanted(device) else 'off'}")
    print(f"model: {args.model} arch={cfg.arch} d_model={cfg.d_model} blocks={cfg.num_blocks} "
          f"params={n_params / 1e6:.1f}M dtype={dtype} "
          f"cuda_graph={graphs_wanted(device, use_graph)} compiled={compile_wanted(device, use_compile)}")
    rows = bench_contexts(model, [int(c) for c in args.contexts.split(",")], args.new_tokens, device, use_graph,
                          args.warmup, use_compile=use_compile, profile=args.profile,
                          use_fused=True if args.fused else None)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
