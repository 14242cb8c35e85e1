"""`xlp generate`: sample a continuation of a prompt from a trained model, streaming the text to the
terminal as tokens arrive; tokens/s on stderr at the end.

Reads a run directory (RUN_DIR/train/model + RUN_DIR/tokenizer/tokenizer.model or .json) or an export
directory (`xlp export`, native or hf format). Decoding uses xlp.xlstm_model.decode: the prompt in
segments, then one step per token on a preallocated state (on GPU: compiled with torch.compile and
captured in a CUDA graph). Settings: the run's `kernels.*` and `decode.*` config keys (their
defaults for an export directory), changed by `key=value` arguments.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from xlp import tokenizer as tk
from xlp.pipeline.trained import ExportError, find_model, load_any, model_settings, pick_device
from xlp.xlstm_model.decode import generate_stream, step_compiles


def run(
    source: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    device: str = "auto",
    dtype: str = "auto",
    use_graph: Optional[bool] = None,
    use_compile: Optional[bool] = None,
    stop_at_eos: bool = True,
    overrides: Sequence[str] = (),
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> dict:
    import torch

    dev = pick_device(device)
    model_dir, tok_path = find_model(Path(source))
    kernels_cfg, decode_cfg = model_settings(Path(source), overrides)
    kernels_cfg.apply()
    tok = tk.load(tok_path)
    model = load_any(model_dir, map_location=dev)
    if dtype == "auto":
        dtype = "bfloat16" if dev == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    model = model.to(getattr(torch, dtype)).eval()
    ids = tok.encode(prompt, add_bos=False)
    if not ids:
        ids = [tok.bos_id]
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**31)))

    if step_compiles(model, torch.device(dev), use_compile, use_fused=None, config=decode_cfg):
        print("[compiling the decode step: once per process, ~40 s on a GPU; --no-compile skips it]", file=err)
    t0 = time.perf_counter()
    new: list[int] = []
    shown = ""
    t_first = None
    out.write(prompt)
    out.flush()
    for token in generate_stream(model, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos=tok.eos_id if stop_at_eos else None, generator=generator, use_graph=use_graph,
                                 use_compile=use_compile, config=decode_cfg):
        t = int(token[0])
        if t_first is None:
            t_first = time.perf_counter()
        if stop_at_eos and t == tok.eos_id:
            break
        new.append(t)
        text = tok.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence (byte fallback): wait for the rest
            continue
        if text.startswith(shown):
            out.write(text[len(shown):])
        else:  # decoding is not prefix-stable here (rare): print the rest of the new text
            out.write(text[len(shown):] if len(text) > len(shown) else "")
        shown = text
        out.flush()
    t_end = time.perf_counter()
    text = tok.decode(new)
    if len(text) > len(shown):
        out.write(text[len(shown):])
    out.write("\n")
    out.flush()
    n = len(new)
    decode_s = t_end - (t_first or t_end)
    stats = {
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "prefill_s": round((t_first or t_end) - t0, 4),  # with the step's compile and graph capture
        "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
        "device": dev,
        "dtype": dtype,
    }
    tps = f"{stats['tokens_per_s']:.1f} tokens/s" if stats["tokens_per_s"] else "n/a tokens/s"
    print(f"[{n} tokens, {tps} decode, prompt {len(ids)} tokens + decoder set-up in {stats['prefill_s']:.2f}s, "
          f"{dev} {dtype}]", file=err)
    return stats


def main(args) -> int:

    try:
        run(args.source, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device, dtype=args.dtype,
            use_graph=False if args.no_cuda_graph else None, use_compile=args.compile,
            stop_at_eos=not args.ignore_eos, overrides=getattr(args, "overrides", ()))
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"xlp generate: error: {e}", file=sys.stderr)
        return 1
    return 0
