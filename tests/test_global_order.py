"""The global row order (xlp.pipeline.data.order): the rows of each step are the same whatever the number of
ranks, loader workers or the micro-batch split; its state resumes on another world size; a mixture
draws rows by weight, with phases. Real shards written by the data library, real DataLoader workers."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from xlp.pipeline.data.loader import ShardLoader
from xlp.pipeline.data.order import Apportioner, GlobalLoader, Mixture, row_hash
from test_data_loader import make_shards

S = 16
G = 8  # rows per step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("order")
    make_shards(out, n_docs=600, partitions=3, shard_bytes=4096, split_every=25)
    return out


def rows_of(shards, *, world: int, micro: int, steps: int, workers: int = 0, streams: int = 4,
            state: dict | None = None, mixture: Mixture | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """{global row index: input_ids} every rank got in `steps` steps, and the merged state after them."""
    got: dict[int, torch.Tensor] = {}
    loaders = []
    per_rank = steps * G // (world * micro)
    for rank in range(world):
        loader = GlobalLoader(shards, seq_len=S, micro_batch_size=micro, rows_per_step=G, rank=rank,
                              world_size=world, num_workers=workers, streams=streams, mixture=mixture)
        if state is not None:
            loader.load_global_state(json.loads(json.dumps(state)))
        for batch in itertools.islice(loader, per_rank):
            assert int(batch["row_hash"]) == sum(row_hash(int(i), torch.cat([x, y[-1:]]).numpy())
                                                 for i, x, y in zip(batch["rows"], batch["input_ids"],
                                                                    batch["targets"]))
            for i, x in zip(batch["rows"].tolist(), batch["input_ids"]):
                assert i not in got
                got[i] = x.clone()
        loaders.append(loader)
    snaps = [ld.snapshots() for ld in loaders]
    return got, loaders[0].global_state(snaps)


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_rows_do_not_depend_on_ranks_workers_or_micro_batches(shards):
    ref, _ = rows_of(shards, world=1, micro=8, steps=6)
    assert sorted(ref) == list(range(6 * G))
    for world, micro, workers in ((2, 4, 0), (2, 2, 0), (4, 1, 0), (1, 2, 2), (2, 2, 2)):
        got, _ = rows_of(shards, world=world, micro=micro, steps=6, workers=workers)
        assert same_rows(got, ref), (world, micro, workers)
    other, _ = rows_of(shards, world=1, micro=8, steps=6, streams=2)
    assert not same_rows(other, ref)  # data.streams is part of the order


def test_state_resumes_on_another_world_size(shards):
    ref, _ = rows_of(shards, world=2, micro=4, steps=40)  # > one epoch of some streams
    _, state = rows_of(shards, world=2, micro=4, steps=15)
    assert state["apportioner"]["row"] == 15 * G
    for world, micro, workers in ((1, 4, 0), (1, 8, 2), (4, 2, 0), (2, 4, 0)):
        after, _ = rows_of(shards, world=world, micro=micro, steps=25, workers=workers, state=state)
        assert same_rows(after, {i: ref[i] for i in range(15 * G, 40 * G)}), (world, micro, workers)
    other = GlobalLoader(shards, seq_len=2 * S, micro_batch_size=4, rows_per_step=G, streams=4)
    with pytest.raises(ValueError, match="seq_len"):  # a state of other data settings is refused
        other.load_global_state(json.loads(json.dumps(state)))


def test_shard_loader_packs_the_same_rows_as_the_global_order(shards):
    """The two readers of the shards share one plan and one row packing: ShardLoader's stream r of K
    (rank r of K, batches of one row) is the global order's stream r of K (one group), whose row j is
    global row j*K + r; the same tokens and doc starts, bit for bit, into the next epoch."""
    K, seed = 4, 3
    plan = ShardLoader(shards, split="train", seq_len=S, batch_size=1, world_size=K, seed=seed)._plan()
    n = max((plan.stream_tokens(g, 0) - 1) // S for g in range(K)) + 20  # every stream crosses an epoch
    by_row = {}
    for batch in itertools.islice(GlobalLoader(shards, seq_len=S, micro_batch_size=K, rows_per_step=K,
                                               streams=K, seed=seed), n):
        for i, x, y, d in zip(batch["rows"].tolist(), batch["input_ids"], batch["targets"], batch["doc_starts"]):
            by_row[i] = (x, y, d)
    for r in range(K):
        loader = ShardLoader(shards, split="train", seq_len=S, batch_size=1, rank=r, world_size=K, seed=seed)
        for j, b in enumerate(itertools.islice(loader, n)):
            x, y, d = by_row[j * K + r]
            assert torch.equal(b["input_ids"][0], x) and torch.equal(b["targets"][0], y), (r, j)
            assert torch.equal(b["doc_starts"][0], d), (r, j)


def test_apportioner_keeps_each_prefix_within_a_row():
    mix = Mixture(groups=("web", "code", "math"), phases=((0, (0.6, 0.3, 0.1)), (10, (0.2, 0.0, 0.8))))
    order = Apportioner(mix, rows_per_step=7)
    picks = [order.next() for _ in range(200)]
    for n in range(1, 64):  # the phase of step 10 begins at row 9 x 7 = 63
        counts = np.bincount(picks[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.6, 0.3, 0.1])) < 1.0 + 1e-9), (n, counts)
    later = picks[70:]
    assert 1 not in picks[63:]  # weight 0 from step 10 on
    assert abs(later.count(2) / len(later) - 0.8) < 0.01
    resumed = Apportioner.restored(mix, 7, json.loads(json.dumps(Apportioner(mix, 7).state())))
    assert [resumed.next() for _ in range(200)] == picks


def test_mixture_groups_read_their_own_shards(shards, tmp_path):
    """Two groups written as the shard stage writes them (records tagged with their group)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for i, rec in enumerate(manifest["shards"]):
        rec["group"] = "even" if i % 2 == 0 else "odd"
    shard_dir = tmp_path / "grouped"
    shard_dir.mkdir()
    for rec in manifest["shards"]:
        (shard_dir / rec["path"]).symlink_to(shards / rec["path"])
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    mix = Mixture.from_config({"even": {"sources": ["a"], "weight": 0.8}, "odd": {"sources": ["b"], "weight": 0.2}}, [])
    ref, state = rows_of(shard_dir, world=1, micro=8, steps=10, mixture=mix)
    got, _ = rows_of(shard_dir, world=2, micro=2, steps=10, workers=2, mixture=mix)
    assert same_rows(got, ref)
    assert state["apportioner"]["totals"] == [64, 16]
    with pytest.raises(ValueError, match="no train shards of mixture group 'web'"):
        GlobalLoader(shard_dir, seq_len=S, micro_batch_size=8, rows_per_step=G,
                     mixture=Mixture.from_config({"web": {"sources": ["a"], "weight": 1.0}}, []))
