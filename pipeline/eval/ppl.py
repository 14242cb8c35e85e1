"""Held-out perplexity, bits per byte, and loss by position at 1x..8x the training length.

Both read the val split through the training loader (xlp.pipeline.data.loader.ShardLoader, one epoch,
no shuffling): packed rows of documents with the state reset at every document start, exactly as
training and its validation saw them.

Bits per byte = total NLL (nats) / ln 2 / total UTF-8 bytes of the predicted tokens. The manifest
records token counts but not text bytes, so the bytes are counted from the tokens themselves:
`common.token_byte_lengths` gives each token id's byte length in decoded text (byte-fallback pieces
1 byte, `<eos>` and other specials 0). The `<eos>` predictions are included in the NLL (they are
part of modelling the text) but add no bytes, so bpb is slightly conservative. Tokenizer-independent:
runs with different vocabularies compare on bpb, not on per-token loss.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from xlp.pipeline.data.loader import ShardLoader
from xlp.pipeline.eval.common import document_positions, finite, token_nll


def val_loader(shard_dir: Path, seq_len: int, batch_size: int):
    """One unshuffled epoch of the val split in (batch_size, seq_len) rows; the batch size shrinks
    when the split has fewer rows than one batch (None when it has not one row)."""
    loader = ShardLoader(shard_dir, split="val", seq_len=seq_len, batch_size=batch_size, shuffle=False, epochs=1)
    if loader.epoch_batches() == 0:
        rows = max(0, (loader.tokens - 1) // seq_len)
        if rows == 0:
            return None
        loader = ShardLoader(shard_dir, split="val", seq_len=seq_len, batch_size=min(batch_size, rows),
                             shuffle=False, epochs=1)
        if loader.epoch_batches() == 0:
            return None
    return loader


def _summary(nll_sum: float, tokens: int, nbytes: int) -> dict:
    loss = nll_sum / max(1, tokens)
    return {
        "loss": finite(loss),
        "ppl": finite(math.exp(min(loss, 700.0))),
        "bits_per_token": finite(loss / math.log(2)),
        "bpb": finite(nll_sum / math.log(2) / nbytes) if nbytes else None,
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }


@torch.no_grad()
def perplexity(models: dict, shard_dir: Path, *, seq_len: int, batch_size: int, max_batches: int,
               byte_lengths: np.ndarray, device: torch.device, log=print) -> dict:
    """NLL, perplexity and bits per byte of each model ({name: model}) on the same val batches."""
    loader = val_loader(shard_dir, seq_len, batch_size)
    if loader is None:
        return {"skipped": f"the val split has fewer than {seq_len + 1} tokens"}
    blen = torch.from_numpy(byte_lengths).to(device)
    sums = {name: 0.0 for name in models}
    tokens = nbytes = 0
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        if max_batches and n >= max_batches:
            break
        x, y, d = (batch[k].to(device) for k in ("input_ids", "targets", "doc_starts"))
        for name, model in models.items():
            sums[name] += float(token_nll(model, x, y, d).double().sum())
        tokens += y.numel()
        nbytes += int(blen[y].sum())
        n += 1
    out: dict = {"seq_len": seq_len, "batches": n, "rows": n * loader.batch_size,
                 "val_tokens_in_split": int(loader.tokens), "seconds": round(time.perf_counter() - t0, 2)}
    for name in models:
        out[name] = _summary(sums[name], tokens, nbytes)
    out["bytes_per_token"] = finite(nbytes / tokens) if tokens else None
    log(f"eval ppl: {n} batches x {loader.batch_size} x {seq_len} tokens, "
        + ", ".join(f"{k} loss {out[k]['loss']:.4f} bpb {out[k]['bpb']:.4f}" for k in models))
    return out


def default_buckets(max_len: int) -> list[int]:
    edges = [0]
    b = 16
    while b < max_len:
        edges.append(b)
        b *= 2
    return edges


@torch.no_grad()
def long_context(model, shard_dir: Path, *, train_len: int, multipliers: list[int], tokens_per_mult: int,
                 batch_size: int, buckets: Optional[list[int]], device: torch.device, log=print) -> dict:
    """Mean loss by position bucket when reading rows of m x train_len tokens, for each multiplier m.

    A token's position is how many tokens of context it had: counted from the row's start or its
    document's first token, whichever is later (the state resets at both). Positions >= train_len
    exist only for m > 1: whether their loss stays level (or keeps falling) is whether the model
    extrapolates past its training length.
    """
    max_len = max(multipliers) * train_len
    edges = list(buckets) if buckets else default_buckets(max_len)
    edges_t = torch.tensor(edges[1:], device=device)
    results = []
    for m in multipliers:
        L = m * train_len
        rows_per_batch = max(1, (batch_size * train_len) // L)
        want_rows = max(1, tokens_per_mult // L)
        loader = val_loader(shard_dir, L, rows_per_batch)
        if loader is None:
            results.append({"multiplier": m, "seq_len": L, "skipped": f"the val split has fewer than {L + 1} tokens"})
            log(f"eval long context {m}x ({L} tokens): skipped, val split too small")
            continue
        nb = len(edges)
        sums = torch.zeros(nb, dtype=torch.float64, device=device)
        counts = torch.zeros(nb, dtype=torch.float64, device=device)
        beyond = torch.zeros(2, dtype=torch.float64, device=device)
        rows = 0
        t0 = time.perf_counter()
        for batch in loader:
            if rows >= want_rows:
                break
            x, y, d = (batch[k].to(device) for k in ("input_ids", "targets", "doc_starts"))
            nll = token_nll(model, x, y, d).double()
            pos = document_positions(d)
            idx = torch.bucketize(pos, edges_t, right=True)
            sums.index_add_(0, idx.flatten(), nll.flatten())
            counts.index_add_(0, idx.flatten(), torch.ones_like(nll).flatten())
            far = pos >= train_len
            beyond[0] += nll[far].sum()
            beyond[1] += far.sum()
            rows += x.shape[0]
        s, c = sums.cpu().numpy(), counts.cpu().numpy()
        table = []
        for i, lo in enumerate(edges):
            hi = edges[i + 1] if i + 1 < len(edges) else max_len
            if lo >= L:
                break
            table.append({"lo": int(lo), "hi": int(min(hi, L)), "tokens": int(c[i]),
                          "loss": finite(s[i] / c[i]) if c[i] else None})
        res = {"multiplier": m, "seq_len": L, "rows": rows, "tokens": int(c.sum()),
               "loss": finite(s.sum() / c.sum()) if c.sum() else None,
               "loss_beyond_train_len": finite(float(beyond[0] / beyond[1])) if beyond[1] > 0 else None,
               "tokens_beyond_train_len": int(beyond[1]),
               "buckets": table, "seconds": round(time.perf_counter() - t0, 2)}
        results.append(res)
        log(f"eval long context {m}x ({L} tokens): {rows} rows, loss {res['loss']:.4f}"
            + (f", beyond {train_len}: {res['loss_beyond_train_len']:.4f}" if res["loss_beyond_train_len"] else ""))
    return {"train_len": train_len, "edges": edges, "results": results}
