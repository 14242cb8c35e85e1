"""Batch-1 decode speed after long prompts: tokens/s and memory at 1k, 4k and 16k tokens of context.

    python benchmarks/bench_decode.py --model xlstm_large_400m                # GPU: bf16, compiled step in a CUDA graph
    python benchmarks/bench_decode.py --model xlstm_large_400m --no-compile   # GPU: eager ops in a CUDA graph
    python benchmarks/bench_decode.py --model xlstm_large_400m --fused        # GPU: hand-fused step in a CUDA graph
    python benchmarks/bench_decode.py --fused --decode pdl=true              # ... kernels overlapped (Hopper PDL)
    python benchmarks/bench_decode.py --model xlstm_large_400m --no-graph --no-compile   # eager baseline
    python benchmarks/bench_decode.py --decode matvec=gemm                   # compiled, cuBLAS matrix-vector products
    python benchmarks/bench_decode.py --fused --variant pdl:pdl=true --variant compiled:fused=false
    python benchmarks/bench_decode.py --model tiny_xlstm_large --device cpu   # CPU check

Random weights (speed does not depend on them). The prompt is read in segments carrying the state
(xlp.xlstm_model.decode.prefill); then --new-tokens greedy steps are timed (StepDecoder.step_greedy: the
argmax is taken on the device in the step's graph, as greedy generation does), each ending in a host
sync (the token is read back, as a streaming generator does). Then the same number of tokens as
`xlp generate --temperature 0` produces them ("run-ahead": StepDecoder.greedy_tokens, the device
up to 4 steps ahead of the host, each token read back as soon as it is there). Every row also says
whether the greedy paths pick the same 8 tokens as the argmax of the plain step. xLSTM's state has a
fixed size, so the time per token should not depend on the context length.

--decode KEY=VALUE[,KEY=VALUE...] sets the base decoder's DecodeConfig (xlp.xlstm_model.decode: the
pipeline's `decode.*` config keys without the prefix). --variant NAME:KEY=VALUE[,KEY=VALUE...]
(repeatable) also measures decoders built with some of those keys changed (VARIANT_KEYS), in the same
process, from the same prefilled states, with their steps interleaved with the base decoder's: ratios
between them are not skewed by a shared machine's drift, and the prompts and the compiles are paid
once. A key a variant names wins over the matching command-line flag (e.g. fused=false overrides
--fused for that variant). The first decoder's set-up time includes the compiles and tuning that the
later ones reuse; a variant's peak memory counts from its own set-up (the base's includes the prompt).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import resource
import shlex
import sys
import time
import traceback
import typing
from pathlib import Path

import torch

from xlp.xlstm_model.config import ModelConfig, load_model_yaml
from xlp.xlstm_model.decode import DecodeConfig, StepDecoder, compile_wanted, graphs_wanted, prefill
from xlp.xlstm_model.lm import build_model

# DecodeConfig keys a variant may change -> the StepDecoder option (set by a command-line flag) that it
# replaces for that variant. The torch.compile options (compile_mode, matvec, tune) are the same for
# every decoder of a run (--decode): the compiled step is shared.
VARIANT_KEYS = {"pdl": None, "mix": None, "fused": "use_fused", "compile": "use_compile", "cuda_graph": "use_graph"}
DECODE_KEYS = tuple(f.name for f in dataclasses.fields(DecodeConfig))


def _setting(key: str, value: str):
    """One decode setting typed as DecodeConfig's field (bool, str or null), as the config would read it."""
    hint = typing.get_type_hints(DecodeConfig)[key]
    if value == "" and type(None) in typing.get_args(hint):
        return None
    if hint is bool:
        word = value.lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"Value '{value}' is not a valid bool")
    return value


def parse_settings(text: str, what: str, keys=DECODE_KEYS) -> dict:
    """'KEY=VALUE[,KEY=VALUE...]' -> {KEY: value typed as DecodeConfig's field}; the error names `what`,
    the bad part and the valid keys. (No OmegaConf: the bench runs where only torch and triton are.)"""
    out = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{what}: {item!r} is not key=value (keys: {', '.join(keys)})")
        if key not in keys:
            extra = (" (compile_mode, matvec and tune are the same for every decoder of a run: give them with "
                     "--decode)") if key in DECODE_KEYS else ""
            raise ValueError(f"{what}: unknown key {key!r}; valid: {', '.join(keys)}{extra}")
        try:
            out[key] = _setting(key, value.strip())
        except ValueError as e:
            raise ValueError(f"{what}: {item!r}: {e}") from None
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE[,KEY=VALUE...]' -> (NAME, {KEY: value}) over VARIANT_KEYS; the error names the
    bad part. Values are checked when the variant's decoder is built (a bad one fails that variant)."""
    name, sep, rest = spec.partition(":")
    if not sep or not re.fullmatch(r"[\w.+-]+", name) or name == "base":
        raise ValueError(f"--variant {spec!r}: expected NAME:key=value[,key=value...] with a NAME of letters, "
                         f"digits, '_.+-' other than 'base'")
    return name, parse_settings(rest, f"--variant {spec!r}", tuple(VARIANT_KEYS))


def model_config(name: str, overrides: list[str], vocab_size: int) -> ModelConfig:
    cfg = load_model_yaml(name, overrides)
    if cfg.vocab_size is None:
        cfg.vocab_size = vocab_size
    return cfg


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def pdl_on(device: torch.device, config: DecodeConfig) -> bool:
    """Whether fused kernels launched with this config use programmatic dependent launch (decode.pdl
    on a GPU that has it)."""
    from xlp.kernels.triton.decode import pdl_wanted

    return pdl_wanted(device, config.pdl)


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


def label(r: dict) -> str:
    return f"context {r['ctx']:>6}" + (f" [{r['variant']}]" if r["variant"] != "base" else "")


def print_row(r: dict) -> None:
    print(f"{label(r)}: {r['tokens_per_s']:8.1f} tokens/s  {r['ms_per_token']:7.3f} ms/token (median {r['median_ms']:.3f})  "
          f"prefill {r['prefill_s']:.2f}s  setup {r['setup_s']:.1f}s  state {r['state_mb']:.2f} MiB  {r['memory']}  "
          f"graph={r['graph']} compiled={r['compiled']} fused={r['fused']} pdl={r['pdl']}  vs eager step: max|dlogit| {r['max_abs_diff']:.3g} "
          f"same argmax {r['same_argmax']}; {r['agreement']}", flush=True)


@torch.no_grad()
def set_up(model, state, token, expected, config: DecodeConfig, options: dict, device, warmup: int,
           own_peak: bool = False):
    """A decoder with `config` and `options` on a copy of `state`, its graphs captured, checked against
    the eager step's logits `expected` and warmed up -> (its row's fields, the decoder, its next input
    token). own_peak: its peak memory counts from here."""
    if own_peak and device.type == "cuda":  # its own peak, not the prompt's or other decoders'
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    decoder = StepDecoder(model, state, 1, config=config, **options)  # copies the state: each variant starts alike
    pdl = decoder.fused and device.type == "cuda" and pdl_on(device, config)
    got = decoder.step(token).float()
    diff = (got - expected.float()).abs().max().item()
    same_argmax = bool(got.argmax(-1).eq(expected.argmax(-1)).all())
    first = decoder.step_greedy(token)  # its graph (step + argmax) is captured on first use
    first.item()
    setup_s = time.perf_counter() - t0
    agreement = greedy_agreement(decoder, first)
    for _ in range(warmup):
        first = decoder.step_greedy(first)
        first.item()
    row = {"setup_s": setup_s, "max_abs_diff": diff, "same_argmax": same_argmax, "memory": memory_mb(device),
           "state_mb": state_mb(state), "graph": decoder.use_graph, "compiled": decoder.compiled,
           "fused": decoder.fused, "pdl": pdl, "agreement": agreement, "times": []}
    return row, decoder, first


@torch.no_grad()
def bench_contexts(model, contexts: list[int], new_tokens: int, device, use_graph, warmup: int,
                   rounds: int = 8, use_compile=None, profile: bool = False, use_fused=None,
                   variants: tuple = (), config: DecodeConfig | None = None) -> list[dict]:
    """Prefill each context, build a decoder on it for the base settings (`config` and the use_*
    options) and each variant (name, {DecodeConfig key: value}), then time greedy steps round-robin over all decoders (rounds x new_tokens/rounds steps
    each), so a noisy machine slows every one alike; then the run-ahead generation of new_tokens per
    decoder. Each decoder's first logits are compared with the plain eager `model.step` on the same
    state (max_abs_diff), and its greedy tokens with the argmax of its plain step. Each row is printed
    as soon as it is measured."""
    rows, decoders, tokens, failed = [], [], [], []
    config = config or DecodeConfig()
    base = {"use_graph": use_graph, "use_compile": use_compile, "use_fused": use_fused}
    settings = (("base", {}), *variants)
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
        for name, changes in settings:
            left_to_config = {VARIANT_KEYS[key] for key in changes}
            options = {k: (None if k in left_to_config else v) for k, v in base.items()}
            try:
                row, decoder, first = set_up(model, state, token, expected, dataclasses.replace(config, **changes),
                                             options, device, warmup, own_peak=name != "base")
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
                failed.append(name)
                print(f"context {ctx:>6} [{name}]: FAILED to set up: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                continue
            rows.append({"ctx": ctx, "variant": name, "prefill_s": prefill_s, **row})
            decoders.append(decoder)
            tokens.append(first)
        del ids, logits, expected
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
    names = [name for name, _ in settings]
    by = {(r["ctx"], r["variant"]): r for r in rows}
    for name in names:
        if len(contexts) > 1 and (contexts[0], name) in by and (contexts[-1], name) in by:
            lo, hi = by[contexts[0], name], by[contexts[-1], name]
            print(f"ms/token at {hi['ctx']} vs {lo['ctx']}{'' if name == 'base' else f' [{name}]'}: "
                  f"{hi['ms_per_token'] / lo['ms_per_token']:.3f}x mean, {hi['median_ms'] / lo['median_ms']:.3f}x median",
                  flush=True)
    for name in names[1:]:
        ratios = "  ".join(f"{ctx}: {by[ctx, name]['ms_per_token'] / by[ctx, 'base']['ms_per_token']:.3f}x"
                           for ctx in contexts if (ctx, name) in by and (ctx, "base") in by)
        if ratios:
            print(f"ms/token [{name}] vs base: {ratios}", flush=True)
    if profile:  # each decoder's first context
        for name in names:
            j = next((j for j, r in enumerate(rows) if r["variant"] == name), None)
            if j is not None:
                print(f"profile of {label(rows[j])}:")
                print_profile(decoders[j], tokens[j], device)
    # Greedy generation as xlp generate runs it: the device runs ahead of the host (greedy_tokens).
    for j, decoder in enumerate(decoders):
        t0 = time.perf_counter()
        for token in decoder.greedy_tokens(tokens[j], new_tokens):
            token.item()
        rows[j]["run_ahead_tps"] = new_tokens / (time.perf_counter() - t0)
        print(f"{label(rows[j])}: run-ahead (xlp generate --temperature 0) {rows[j]['run_ahead_tps']:8.1f} "
              f"tokens/s  {1e3 / rows[j]['run_ahead_tps']:7.3f} ms/token", flush=True)
    if failed:
        print(f"FAILED to set up: {', '.join(sorted(set(failed)))} (see above)", flush=True)
    return rows, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--profile", action="store_true", help="print the kernels of 20 decode steps (each variant's)")
    p.add_argument("--decode", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                   help=f"the base decoder's settings (DecodeConfig; keys: {', '.join(DECODE_KEYS)})")
    p.add_argument("--json", type=Path, help="append each measured row to this file as a JSON line")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also measure a decoder built with these settings changed, interleaved with the base one "
                        f"(KEY: {', '.join(VARIANT_KEYS)}); repeatable")
    args = p.parse_args(argv)
    try:
        config = DecodeConfig(**parse_settings(args.decode, "--decode")) if args.decode else DecodeConfig()
        config.validate()
        variants = tuple(parse_variant(v) for v in args.variant)
    except ValueError as e:
        p.error(str(e))
    if len({name for name, _ in variants}) != len(variants):
        p.error("--variant: each variant needs its own NAME")
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts {args.contexts!r}: expected comma-separated token counts, e.g. 1024,4096,16384")
    if len(set(contexts)) != len(contexts) or min(contexts) < 1:
        p.error(f"--contexts {args.contexts!r}: each context once, each at least 1 token")

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
    print(f"command: {shlex.join([sys.executable, 'benchmarks/bench_decode.py', *(argv or sys.argv[1:])])}")
    print(f"machine: {machine(device)}")
    fused = True if args.fused else None
    if compile_wanted(device, use_compile, config) and (not (args.fused or config.fused)
                                                        or any("fused" in changes for _, changes in variants)):
        print("compile options (decode.compile_mode, decode.matvec, decode.tune): mode=%s "
              "matvec_as_reduction=%s coordinate_descent_tuning=%s" % config.compile_options())
    if (args.fused or config.fused) and device.type == "cuda":
        print(f"fused step: programmatic dependent launch (decode.pdl) {'on' if pdl_on(device, config) else 'off'}"
              f"{' (base)' if variants else ''}")
    if args.decode:
        print("decode: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
    for name, changes in variants:
        print(f"variant {name}: " + " ".join(f"{k}={v}" for k, v in changes.items()))
    print(f"model: {args.model} arch={cfg.arch} d_model={cfg.d_model} blocks={cfg.num_blocks} "
          f"params={n_params / 1e6:.1f}M dtype={dtype} "
          f"cuda_graph={graphs_wanted(device, use_graph, config)} compiled={compile_wanted(device, use_compile, config)}")
    rows, failed = bench_contexts(model, contexts, args.new_tokens, device, use_graph,
                          args.warmup, use_compile=use_compile, profile=args.profile,
                          use_fused=fused, variants=variants, config=config)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "decode", "model": args.model, "machine": machine(device), **r}) + "\n")
            for name in failed:
                f.write(json.dumps({"bench": "decode", "model": args.model, "variant": name, "error": "failed to set up"}) + "\n")
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
