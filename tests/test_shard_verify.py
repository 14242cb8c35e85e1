"""Verified shards (issue 17, item 2): the loader checks each shard against the manifest (size, then
sha256) the first time a process opens it; a damaged or truncated shard fails training with one line
naming it, or with data.on_error=skip is left out, logged and counted; the shard stage's resume
checks the shards it keeps and rewrites a bad one. Real shard files throughout."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from xlp.pipeline.data import shards as shards_mod
from xlp.pipeline.data.loader import ShardLoader
from xlp.pipeline.data.shards import MANIFEST, ShardError, read_shard
from test_train import make_shards

S, B = 16, 4


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("clean") / "shard")


@pytest.fixture()
def data(clean, tmp_path) -> Path:
    """A private copy of the clean shards to damage."""
    out = tmp_path / "shard"
    shutil.copytree(clean, out)
    return out


def manifest(shard_dir: Path) -> dict:
    return json.loads((shard_dir / MANIFEST).read_text())


def train_shards(shard_dir: Path) -> list[dict]:
    return [s for s in manifest(shard_dir)["shards"] if s["split"] == "train"]


def first_shard_of(shard_dir: Path, stream: int, n_streams: int, k: int = 0) -> dict:
    """The manifest entry of the k-th shard stream `stream` (of n_streams) reads in epoch 0 (seed 0)."""
    loader = ShardLoader(shard_dir, split="train", seq_len=S, batch_size=B, world_size=n_streams)
    plan = loader._plan()
    assert plan.shard_level
    return loader.shards[plan.pieces(stream, 0)[k][0]]


def flip(path: Path, n: int = 64) -> None:
    """Zero n bytes in the middle of the file: inside token data, so the tar still parses."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    assert any(data[mid:mid + n])
    data[mid:mid + n] = bytes(n)
    path.write_bytes(bytes(data))


def stream_tokens(batches) -> list[int]:
    """The token stream a sequence of batches was cut from (rows overlap by one token)."""
    out: list[int] = []
    for b in batches:
        for x, y in zip(b["input_ids"].tolist(), b["targets"].tolist()):
            if not out:
                out.append(x[0])
            assert out[-1] == x[0]  # each row starts with the last token of the previous one
            out.extend(y)
    return out


def expected_tokens(shard_dir: Path, stream: int, n_streams: int, leave_out: set[str] = frozenset()) -> list[int]:
    """Stream `stream`'s epoch-0 tokens computed from the shard files, without the loader's packing."""
    loader = ShardLoader(shard_dir, split="train", seq_len=S, batch_size=B, world_size=n_streams)
    plan = loader._plan()
    out: list[int] = []
    for piece in plan.pieces(stream, 0):
        rec = loader.shards[piece[0]]
        if rec["path"] in leave_out:
            continue
        samples = read_shard((shard_dir / rec["path"]).read_bytes(), loader.dtype)
        for i in plan.kept(stream, 0, piece):
            out.extend(samples[i][1].tolist())
    return out


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# the loader


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_bytes_fail_naming_the_shard_and_both_hashes(data, workers):
    bad = first_shard_of(data, 0, 1)
    path = data / bad["path"]
    flip(path)
    actual = shards_mod.sha256_file(path)
    loader = ShardLoader(data, split="train", seq_len=S, batch_size=B, num_workers=workers, epochs=1)
    got = []
    with pytest.raises(ShardError) as err:
        for batch in loader:
            got.append(batch)
    msg = one_line(err.value)  # from a DataLoader worker too: one line, no pasted traceback
    assert str(path) in msg and bad["sha256"] in msg and actual in msg and "damaged" in msg
    assert "--force" in msg
    if workers == 0:
        assert not got  # the bad shard is the first one read: none of its rows was yielded


def test_damage_that_breaks_the_tar_is_reported_as_the_hash_mismatch(data):
    bad = first_shard_of(data, 0, 1)
    path = data / bad["path"]
    blob = bytearray(path.read_bytes())
    blob[:512] = bytes(512)  # the first member's header: the tar no longer parses
    path.write_bytes(bytes(blob))
    with pytest.raises(ShardError) as err:
        next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B)))
    msg = one_line(err.value)
    assert str(path) in msg and bad["sha256"] in msg and shards_mod.sha256_file(path) in msg and "damaged" in msg


def test_truncated_shard_fails_naming_it_before_parsing(data):
    bad = first_shard_of(data, 0, 1)
    path = data / bad["path"]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ShardError) as err:
        next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B)))
    msg = one_line(err.value)
    assert str(path) in msg and f"{size // 2} bytes" in msg and f"says {size}" in msg and "(truncated)" in msg
    assert "doclens" not in msg


def test_missing_shard_fails_naming_it(data):
    bad = first_shard_of(data, 0, 1)
    (data / bad["path"]).unlink()
    with pytest.raises(ShardError, match="missing") as err:
        next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B)))
    assert str(data / bad["path"]) in one_line(err.value)


def test_a_manifest_without_hashes_still_names_an_unreadable_shard(data):
    """Before verification the symptom was `KeyError: 'doclens'`, naming nothing."""
    m = manifest(data)
    for s in m["shards"]:
        s.pop("sha256"), s.pop("bytes")
    (data / MANIFEST).write_text(json.dumps(m))
    bad = first_shard_of(data, 0, 1)
    path = data / bad["path"]
    path.write_bytes(path.read_bytes()[:1536])  # the first member (tokens) whole, its doclens cut off
    with pytest.raises(ShardError) as err:
        next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B)))
    msg = one_line(err.value)
    assert str(path) in msg and "not a readable token shard" in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_the_shard_and_keeps_every_other_row(clean, data, workers, caplog):
    world, nw = 2, max(1, workers)
    n_streams = world * nw
    bad = first_shard_of(data, 1 * nw, n_streams)  # the first shard of rank 1's (first worker's) stream
    flip(data / bad["path"])
    caplog.set_level(logging.WARNING, logger="xlp.pipeline.data.loader")

    def run(shard_dir, rank, on_error):
        loader = ShardLoader(shard_dir, split="train", seq_len=S, batch_size=B, rank=rank, world_size=world,
                             num_workers=workers, epochs=1, on_error=on_error)
        return loader, list(loader)

    # rank 0 does not read the bad shard: its batches are those of the clean data, bit for bit
    _, ref0 = run(clean, 0, "fail")
    l0, got0 = run(data, 0, "skip")
    assert len(got0) == len(ref0) > 0 and l0.skipped_shards == 0
    for a, b in zip(ref0, got0):
        assert all(a[k].equal(b[k]) for k in a)
    # rank 1: the stream of the clean data with exactly that shard's tokens left out, order kept
    l1, got1 = run(data, 1, "skip")
    assert l1.skipped_shards == 1 and list(l1.skipped) == [bad["path"]]
    assert bad["sha256"] in l1.skipped[bad["path"]]
    want = [expected_tokens(clean, nw + w, n_streams, {bad["path"]}) for w in range(nw)]
    assert len(want[0]) < len(expected_tokens(clean, nw, n_streams))  # the shard did hold tokens of that stream
    # the batches arrive round-robin from the workers' streams, a stream dropping out when it ends
    left = [((len(e) - 1) // S) // B for e in want]
    assert sum(left) == len(got1)
    mine: list[list] = [[] for _ in range(nw)]
    w = 0
    for batch in got1:
        while not left[w]:
            w = (w + 1) % nw
        mine[w].append(batch)
        left[w] -= 1
        w = (w + 1) % nw
    for w in range(nw):
        t = stream_tokens(mine[w])
        assert t == want[w][:len(t)] and len(want[w]) - (B * S + 1) <= len(t)
    assert any(bad["path"] in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_skip_resumes_exactly(data):
    """The global order (what training reads) resumed from its state before and after a skipped shard."""
    from xlp.pipeline.data.order import GlobalLoader

    first = first_shard_of(data, 0, 1)
    bad = first_shard_of(data, 0, 1, k=1)  # the second shard read
    flip(data / bad["path"])
    kw = dict(seq_len=S, micro_batch_size=B, rows_per_step=B, streams=1, on_error="skip")
    per_shard = first["tokens"] // (S * B)
    n = 3 * per_shard  # well past the bad shard
    it = iter(GlobalLoader(data, **kw))
    ref = [next(it) for _ in range(n)]
    for at in (per_shard // 2, per_shard + 3):  # a checkpoint before the bad shard, one after it
        before = GlobalLoader(data, **kw)
        it = iter(before)
        for _ in range(at):
            next(it)
        again = GlobalLoader(data, **kw)
        again.load_global_state(json.loads(json.dumps(before.global_state([before.snapshots()]))))
        it = iter(again)
        for want in ref[at:]:
            got = next(it)
            assert all(want[k].equal(got[k]) for k in want)
        assert len(again.skipped) == (1 if at < per_shard else 0)


def test_every_shard_bad_is_an_error_not_a_silent_spin(data):
    for rec in train_shards(data):
        flip(data / rec["path"])
    with pytest.raises(ShardError, match="every shard it reads"):
        next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B, on_error="skip")))


def test_each_shard_is_hashed_once_per_process(data, monkeypatch):
    calls = []
    real = shards_mod.hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(*a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(shards_mod, "hashlib", Counting)
    monkeypatch.setattr(shards_mod, "_verified", set())
    n = len(train_shards(data))
    loader = ShardLoader(data, split="train", seq_len=S, batch_size=B, shuffle=False)
    per_epoch = (sum(s["tokens"] for s in loader.shards) - 1) // S // B
    it = iter(loader)
    for _ in range(per_epoch * 2 + 3):  # into a third epoch: every shard read three times
        next(it)
    assert len(calls) == n
    # a file replaced since it was verified (a new mtime/inode) is checked again
    rec = loader.shards[0]
    path = data / rec["path"]
    blob = path.read_bytes()
    path.unlink()
    path.write_bytes(blob)
    next(iter(ShardLoader(data, split="train", seq_len=S, batch_size=B, shuffle=False)))
    assert len(calls) == n + 1


def test_on_error_is_validated(clean):
    with pytest.raises(ValueError, match="fail, skip"):
        ShardLoader(clean, split="train", seq_len=S, batch_size=B, on_error="ignore")


# ---------------------------------------------------------------------------------------------
# the shard stage's resume


def test_shard_stage_resume_rewrites_damaged_kept_shards(tmp_path):
    from test_data_shard import run_stage, shard_hashes

    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    try:
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        words = "shard verify tar manifest sha256 bytes loader resume partition record token".split()
        rng = np.random.default_rng(0)
        for f in range(4):  # many small documents: several shards per partition
            recs = [{"text": " ".join(rng.choice(words, size=int(rng.integers(10, 40))))} for _ in range(300)]
            (corpus / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        ov = [f"data.sources=[{corpus}]", "tokenizer.vocab_size=300", "tokenizer.sample_bytes=100000",
              "data.partition_bytes=30000", "data.shard_bytes=1024", "data.sample_tokens=64",
              "data.val_fraction=0.05", "data.num_workers=1"]
        run = tmp_path / "run"
        run_stage("tokenizer", run, ov)
        first = run_stage("shard", run, ov)
        expected = shard_hashes(run)
        out = run / "shard"
        assert first["shards_damaged"] == 0 and first["partitions"] >= 3

        # what an interrupted attempt leaves: no manifest; partition a finished (its record there),
        # partition b unfinished (no record) with the shards written so far
        by_part: dict[int, list[Path]] = {}
        for p in sorted(out.glob("train-*.tar")):
            by_part.setdefault(int(p.name.split("-")[1]), []).append(p)
        a, b = [i for i in sorted(by_part) if len(by_part[i]) >= 3][:2]
        (out / MANIFEST).unlink()
        (out / "meta" / f"part-{b:05d}.json").unlink()
        p0, p1 = by_part[a], by_part[b]
        flip(p0[1])  # a finished partition's shard, bytes zeroed
        with open(p1[2], "r+b") as f:  # an unfinished partition's kept shard, cut short
            f.truncate(f.seek(0, 2) // 2)
        untouched = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")
                     if not p.name.startswith((f"train-{a:05d}-", f"train-{b:05d}-"))}
        untouched.update({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (p0[0], p1[0], p1[1])})

        m = run_stage("shard", run, ov, resumed=True)
        assert m["shards_damaged"] == 2
        assert shard_hashes(run) == expected  # rewritten, byte-identical to the first run's
        for p in list(out.glob("*.tar")):
            assert shards_mod.check_shard_file(p, next(r for r in manifest(out)["shards"] if r["path"] == p.name)) is None
        now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
        assert all(now[name] == v for name, v in untouched.items())  # the good shards were kept as they were

        # a resume with nothing wrong keeps everything and counts nothing
        (out / MANIFEST).unlink()
        again = run_stage("shard", run, ov, resumed=True)
        assert again["shards_damaged"] == 0 and again["shards_written"] == 0
        assert shard_hashes(run) == expected

        # what an attempt under another partitioning leaves (plan_partitions changed between versions):
        # partition a's records name other files, and a partition the corpus no longer has is there
        (out / MANIFEST).unlink()
        other = "0" * 16
        for meta in [out / "meta" / f"part-{a:05d}.json", *(out / "meta").glob(f"*-{a:05d}-*.tar.json")]:
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "plan": other}))
        n = first["partitions"]
        stray = out / f"train-{n:05d}-0000.tar"
        shutil.copy(p1[0], stray)
        rec = json.loads((out / "meta" / f"{p1[0].name}.json").read_text())
        (out / "meta" / f"{stray.name}.json").write_text(json.dumps({**rec, "path": stray.name, "partition": n}))
        splits_of_a = {p.name.split("-")[0] for p in out.glob(f"*-{a:05d}-*.tar")}
        m = run_stage("shard", run, ov, resumed=True)
        assert m["shards_damaged"] == len(splits_of_a) + 1  # a's first shard of each split, the stray partition
        assert not stray.exists() and not (out / "meta" / f"{stray.name}.json").exists()
        assert shard_hashes(run) == expected  # partition a rewritten from its files: the same bytes
    finally:
        if started:
            ray.shutdown()


def test_complete_shards_keeps_the_verified_prefix(data):
    """The writer side's check on its own: a truncated kept shard ends the prefix; it and the later
    shards of that (split, partition) are removed, and the problem names it."""
    recs = train_shards(data)
    assert len(recs) >= 4
    with open(data / recs[2]["path"], "r+b") as f:
        f.truncate(100)
    damaged: list[str] = []
    kept = shards_mod.complete_shards(data, "train", 0, damaged)
    assert [r["path"] for r in kept] == [r["path"] for r in recs[:2]]
    assert len(damaged) == 1 and str(data / recs[2]["path"]) in damaged[0] and "100 bytes" in damaged[0]
    assert sorted(p.name for p in data.glob("train-*.tar")) == [r["path"] for r in recs[:2]]
    assert not list((data / "meta").glob("train-00000-0002*"))


# ---------------------------------------------------------------------------------------------
# slow: real DeepSpeed ranks


def _train_damaged(tmp_path, clean, overrides):
    from test_train import train

    data = tmp_path / "shard"
    shutil.copytree(clean, data)
    bad = first_shard_of(data, 1, 2)  # rank 1 (of 2, no loader workers) reads it first
    flip(data / bad["path"])
    common = ["train.steps=3", "train.eval_every=0", "train.save_every=0", "model.d_model=16", "data.seq_len=16"]
    return data, bad, (lambda: train(tmp_path / "run", data, common + overrides))


@pytest.mark.slow
def test_training_over_a_damaged_shard_fails_naming_it(tmp_path, clean):
    from xlp.pipeline.cluster.launch import TrainFailed

    data, bad, go = _train_damaged(tmp_path, clean, [])
    with pytest.raises(TrainFailed) as err:
        go()
    head = str(err.value).splitlines()[0]
    actual = shards_mod.sha256_file(data / bad["path"])
    assert "ShardError" in head and str(data / bad["path"]) in head
    assert bad["sha256"] in head and actual in head


@pytest.mark.slow
def test_training_with_skip_counts_the_shard(tmp_path, clean):
    data, bad, go = _train_damaged(tmp_path, clean, ["data.on_error=skip"])
    result = go()
    assert result["step"] == 3 and result["shards_skipped"] == 1
    assert bad["path"] in (tmp_path / "run" / "train" / "logs" / "rank_1.log").read_text()
