"""What every evaluation shares: the device, the trained and untrained models, per-token losses with
the training loop's document semantics, the byte length of tokens, and the val split's documents.

Document semantics (the same as training): a document is scored as the row `[eos] + doc[:-1]`
predicting `doc`, with the recurrent state / attention reset at the document's first token
(`doc_starts` True at positions 0 and 1). In packed training rows the token before a document is
the previous document's `<eos>`, and the state resets at the document's first token; so `<eos>` is
the context the model learnt to predict a document's first token from.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from xlp import tokenizer
from xlp.pipeline.core.diskfull import writing
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.core.stage import atomic_write_json
from xlp.pipeline.data.shards import load_manifest, open_bytes, read_shard
from xlp.xlstm_model import build_model, load_model


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("eval.device=cuda but torch sees no GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def set_threads(threads: int) -> int:
    """torch CPU threads for the stage (Ray starts task workers with one)."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def load_trained(run_dir: Path, device: torch.device):
    model = load_model(RunLayout(run_dir).train.model_dir, map_location="cpu").to(device)
    return model.eval()


def build_untrained(model_cfg, seed: int, device: torch.device):
    """The model the train stage started from: same config, same seed (train seeds torch with
    run.seed right before build_model)."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    return model.to(device).eval()


def load_tokenizer(run_dir: Path):
    return tokenizer.load(RunLayout(run_dir).tokenizer_model)


def token_byte_lengths(tok, vocab_size: Optional[int] = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text (the tokenizer's token_bytes: SentencePiece's
    byte pieces one byte, specials none, a byte-level BPE's tokens one byte per character), ids past the
    tokenizer (the model's vocabulary is rounded up to a multiple of 64) none. Summed over a token
    sequence this is len(decode(ids).encode()) (a test checks), without decoding every evaluated row."""
    own = tok.token_bytes()
    out = np.zeros(max(len(own), vocab_size or 0), dtype=np.int64)
    out[:len(own)] = own
    return out


def document_positions(doc_starts: torch.Tensor) -> torch.Tensor:
    """(B, S) bool -> (B, S) long: tokens of context each position has since the last reset (the
    row's start or the current document's first token), i.e. 0 at a reset."""
    B, S = doc_starts.shape
    ar = torch.arange(S, device=doc_starts.device).expand(B, S)
    starts = doc_starts.clone()
    starts[:, 0] = True
    last = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - last


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, targets: torch.Tensor,
              doc_starts: Optional[torch.Tensor] = None, chunk_tokens: int = 8192) -> torch.Tensor:
    """(B, S) negative log-likelihoods (nats, float32) of the targets. The logits are made from the
    final hidden states a slice of tokens at a time, so (B, S, vocab) never exists at once."""
    hidden = model.hidden_states(input_ids, doc_starts).flatten(0, 1)
    flat_t = targets.flatten()
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_tokens):
        logits = model.logits(hidden[s:s + chunk_tokens]).float()
        out[s:s + chunk_tokens] = F.cross_entropy(logits, flat_t[s:s + chunk_tokens], reduction="none")
    return out.view(targets.shape)


def val_documents(shard_dir: Path, max_docs: Optional[int] = None) -> Iterator[np.ndarray]:
    """The val split's documents in shard order, each as int64 token ids without its final <eos>."""
    manifest = load_manifest(shard_dir)
    dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]])
    n = 0
    for shard in manifest["shards"]:
        if shard["split"] != "val":
            continue
        for _, tokens, lens in read_shard(open_bytes(shard_dir, shard["path"]), dtype):
            start = 0
            for length in lens:
                doc = tokens[start:start + int(length)].astype(np.int64)
                start += int(length)
                yield doc[:-1] if len(doc) else doc
                n += 1
                if max_docs is not None and n >= max_docs:
                    return


def finite(x: float) -> Optional[float]:
    """x as a float, or None when it is not finite (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def write_json(path: Path, obj) -> None:
    """`obj` as JSON, atomically; a full disk raises DiskFull naming `path`."""
    with writing(path):
        atomic_write_json(Path(path), obj)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tensor_bytes(obj) -> int:
    """Total bytes of the tensors in a nested structure (a generation state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0
