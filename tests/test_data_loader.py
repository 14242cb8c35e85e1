"""ShardLoader: split across ranks x workers, deterministic shuffle, packing."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xlp.pipeline.data.loader import ShardLoader, _segments
from xlp.pipeline.data.shards import MANIFEST, ShardWriter, build_manifest

EOS = 3
ID0 = 1000  # document d starts with token ID0 + d; no other token is >= ID0


def make_shards(out: Path, n_docs: int, partitions: int, shard_bytes: int, split_every: int = 0) -> dict:
    """Synthetic documents written by the real ShardWriter; every 'split_every'-th doc goes to val."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    docs = {"train": [], "val": []}
    per_part = -(-n_docs // partitions)
    for p in range(partitions):
        writers = {s: ShardWriter(out, s, p, dtype=np.dtype("<u2"), sample_tokens=64, shard_bytes=shard_bytes)
                   for s in ("train", "val")}
        for d in range(p * per_part, min(n_docs, (p + 1) * per_part)):
            body = rng.integers(4, ID0, size=int(rng.integers(3, 90)))
            doc = np.concatenate([[ID0 + d], body, [EOS]]).astype(np.int64)
            split = "val" if split_every and d % split_every == 0 else "train"
            writers[split].add_doc(doc, "synthetic")
            docs[split].append(doc)
        for w in writers.values():
            w.close()
    m = build_manifest(out, dtype=np.dtype("<u2"), tokenizer_info={"eos_id": EOS}, config={},
                       read_counts={}, per_source={})
    (out / MANIFEST).write_text(json.dumps(m))
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    docs = make_shards(out, n_docs=600, partitions=3, shard_bytes=4096, split_every=25)
    return out, docs


def take(loader, n):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(loader, n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_layout(shards):
    out, docs = shards
    m = json.loads((out / MANIFEST).read_text())
    assert m["splits"]["train"]["shards"] >= 8 and m["splits"]["val"]["shards"] == 3
    assert m["splits"]["train"]["docs"] == len(docs["train"]) and m["splits"]["val"]["docs"] == len(docs["val"])


def test_packing_targets_and_doc_starts(shards):
    out, docs = shards
    S, B = 32, 4
    loader = ShardLoader(out, split="train", seq_len=S, batch_size=B, epochs=1, shuffle=False)
    batches = list(loader)
    assert len(batches) == loader.epoch_batches() > 0
    x = torch.cat([b["input_ids"] for b in batches])
    y = torch.cat([b["targets"] for b in batches])
    d = torch.cat([b["doc_starts"] for b in batches])
    assert x.shape[1] == S and x.dtype == torch.long and d.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets = inputs shifted by one
    assert torch.equal(y[:-1, -1], x[1:, 0])  # rows continue the packed stream
    stream = torch.cat([x.reshape(-1), y[-1, -1:]])
    expect = torch.from_numpy(np.concatenate(docs["train"]))  # unshuffled: shard order = write order
    assert torch.equal(stream, expect[: len(stream)])
    assert bool(d[:, 0].all())
    is_start = x >= ID0
    assert torch.equal(d[:, 1:], is_start[:, 1:])


def test_epoch_covers_every_sample_once_2_ranks_x_2_workers(shards):
    out, _ = shards
    for split in ("train", "val"):  # train: whole shards per stream; val (3 shards < 4 streams): by sample
        keys_all = []
        plan = ShardLoader(out, split=split, seq_len=16, batch_size=2, world_size=2, num_workers=2)._plan()
        assert plan.shard_level == (split == "train")
        every = sorted((s, i) for s in range(len(plan.shards)) for i in range(plan.shards[s]["samples"]))
        for epoch in (0, 1):
            seen = []
            for g in range(4):
                for piece in plan.pieces(g, epoch):
                    seen.extend((piece[0], int(i)) for i in plan.kept(g, epoch, piece))
            assert sorted(seen) == every, (split, epoch)  # no repeats, none missing
            keys_all.append(seen)
        assert keys_all[0] != keys_all[1]  # reshuffled per epoch


def packed_rows(plan, g: int, S: int) -> list[np.ndarray]:
    """Stream g's epoch-0 rows by the definition, not by the loader's packing: its tokens concatenated,
    row i = tokens[i*S : i*S + S+1]."""
    tokens = np.concatenate([t for t, _, _ in _segments(plan, g, (0, 0, 0, 0), 0)])
    return [tokens[i * S:i * S + S + 1] for i in range((len(tokens) - 1) // S)]


def reference_rank(out, split, S, B, rank, world, nw, seed=0):
    """Batches a rank should get in one epoch, built in this process from the streams' plan."""
    loader = ShardLoader(out, split=split, seq_len=S, batch_size=B, rank=rank, world_size=world,
                         num_workers=nw, seed=seed)
    plan = loader._plan()
    per_stream = []
    for local in range(nw):
        rows = packed_rows(plan, rank * nw + local, S)
        per_stream.append([torch.from_numpy(np.stack(rows[i:i + B])) for i in range(0, len(rows) - B + 1, B)])
    out_batches = []
    for group in itertools.zip_longest(*per_stream):  # the DataLoader's round robin
        out_batches.extend(g for g in group if g is not None)
    return out_batches


def test_real_workers_no_repeats_none_missing(shards):
    out, docs = shards
    S, B, world, nw = 16, 2, 2, 2
    ids_seen = []
    for rank in range(world):
        loader = ShardLoader(out, split="train", seq_len=S, batch_size=B, rank=rank, world_size=world,
                             num_workers=nw, epochs=1)
        got = list(loader)
        ref = reference_rank(out, "train", S, B, rank, world, nw)
        assert len(got) == len(ref) == loader.epoch_batches()
        for g, r in zip(got, ref):
            assert torch.equal(g["input_ids"], r[:, :-1]) and torch.equal(g["targets"], r[:, 1:])
        for b in got:
            x = b["input_ids"]
            ids_seen.extend((x[x >= ID0] - ID0).tolist())
    assert len(ids_seen) == len(set(ids_seen))  # no document twice in the epoch, across ranks and workers
    n_train = len(docs["train"])
    min_len = min(len(doc) for doc in docs["train"])
    max_tail_docs = world * nw * ((B * S + 1) // min_len + 2)  # only each stream's last partial batch is dropped
    assert n_train - max_tail_docs <= len(ids_seen) <= n_train


def test_shuffle_depends_on_seed_only(shards):
    out, _ = shards
    a = take(ShardLoader(out, split="train", seq_len=32, batch_size=2, seed=1), 5)
    b = take(ShardLoader(out, split="train", seq_len=32, batch_size=2, seed=1), 5)
    c = take(ShardLoader(out, split="train", seq_len=32, batch_size=2, seed=2), 5)
    assert same(a, b) and not same(a, c)


def test_one_epoch_counts_and_val(shards):
    out, _ = shards
    loader = ShardLoader(out, split="val", seq_len=8, batch_size=2, rank=0, world_size=2, num_workers=2)
    counts = [loader.epoch_batches(r) for r in range(2)]
    assert len(list(loader.one_epoch())) == counts[0] > 0
    assert loader.common_epoch_batches() == min(counts)
    assert len(list(ShardLoader(out, split="val", seq_len=8, batch_size=2, rank=1, world_size=2,
                                num_workers=2).one_epoch())) == counts[1]


def test_bad_args(shards):
    out, _ = shards
    with pytest.raises(ValueError, match="no 'test' shards"):
        ShardLoader(out, split="test", seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(out, split="train", seq_len=8, batch_size=1, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="shard stage"):
        ShardLoader(out / "nothing", split="train", seq_len=8, batch_size=1)


def test_fsspec_url(shards):
    out, _ = shards
    a = take(ShardLoader(out, split="train", seq_len=32, batch_size=2), 3)
    b = take(ShardLoader(f"file://{out}", split="train", seq_len=32, batch_size=2), 3)
    assert same(a, b)
