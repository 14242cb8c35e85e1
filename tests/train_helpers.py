"""Helpers for the train tests: tiny synthetic shards, configs, and a reader for offline W&B runs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pipeline.config import load_config, to_yaml
from pipeline.data.shards import MANIFEST, ShardWriter, build_manifest, token_dtype

VOCAB = 64
EOS = 2


def synthetic_docs(n_docs: int, seed: int, vocab: int = VOCAB) -> list[np.ndarray]:
    """Documents from a sparse Markov chain: each token has 2 likely successors, so the next-token
    entropy (about 0.8 nats) is far below the unigram entropy (about log(vocab - 3) nats)."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(1234).integers(3, vocab, size=(vocab, 2))
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(40, 200))
        tok = int(rng.integers(3, vocab))
        out = []
        for _ in range(n):
            out.append(tok)
            r = rng.random()
            tok = int(table[tok, 0] if r < 0.7 else table[tok, 1] if r < 0.95 else rng.integers(3, vocab))
        out.append(EOS)
        docs.append(np.asarray(out, dtype=np.int64))
    return docs


def make_shards(out_dir: Path, *, train_docs: int = 400, val_docs: int = 60, shard_bytes: int = 8_000,
                seed: int = 0) -> Path:
    """A shard-stage output (manifest.json + tar shards) written with the data library."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(VOCAB)
    for split, n, s in (("train", train_docs, seed), ("val", val_docs, seed + 1)):
        w = ShardWriter(out_dir, split, 0, dtype=dtype, sample_tokens=512, shard_bytes=shard_bytes)
        for doc in synthetic_docs(n, s):
            w.add_doc(doc, "synthetic")
        w.close()
    manifest = build_manifest(out_dir, dtype=dtype, tokenizer_info={"vocab_size": VOCAB}, config={},
                              read_counts={}, per_source={})
    (out_dir / MANIFEST).write_text(json.dumps(manifest))
    return out_dir


def unigram_entropy(docs: list[np.ndarray]) -> float:
    """Entropy (nats) of the token distribution of the targets (every token after the first)."""
    counts = np.bincount(np.concatenate([d[1:] for d in docs]), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.num_blocks=2", "model.num_heads=2",
    "data.seq_len=32", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup=2", "train.min_lr=3e-4",
    "train.eval_batches=4", "train.log_every=5", "wandb.mode=disabled",
]


def write_config(run_dir: Path, overrides: list[str]) -> Path:
    cfg = load_config(None, [f"run.dir={run_dir}", *TINY, *overrides])
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (`run-<id>.wandb`).

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
    records, each with a 7-byte header (crc32, little-endian uint16 length, type: 1 full, 2 first,
    3 middle, 4 last); each whole record is a protobuf `wandb.proto.Record`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block = 32 * 1024
    pos, rows, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
