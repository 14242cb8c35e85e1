"""Small corpora and settings that cannot work (issue 29, items 6 and 10), from outside: real shards written
by the data library, the real loaders, the train stage's own pre-launch check, `xlp run` on hostile
configs, DeepSpeed on 2 gloo ranks.

- A val split smaller than one validation batch is validated with the rows it has (a partial batch);
  a rank whose stream has no row contributes nothing (no 0/0: val/loss is never nan); a val split with
  no row at all is refused before training, naming the group, data.val_fraction and a data.seq_len that
  works.
- A group with fewer train samples than data.streams is read as fewer streams (said once in the log);
  the global order stays a function of the shards.
- data.val_fraction=0 with the eval stage, and a vocabulary larger than its sample can give, are refused
  before the first stage.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import load_config
from xlp.pipeline.core.errors import ConfigError
from xlp.pipeline.core.layout import MANIFEST
from xlp.pipeline.core.preflight import check_run
from xlp.pipeline.core.stage import StageContext
from xlp.pipeline.data.fit import val_split_check
from xlp.pipeline.data.loader import ShardLoader
from xlp.pipeline.data.order import GlobalLoader, Mixture
from xlp.pipeline.data.shards import ShardWriter, build_manifest, token_dtype
from test_train import VOCAB, synthetic_docs, train

TINY = REPO / "configs" / "tiny.yaml"
S = 32


def write_shards(out: Path, groups: dict[str, dict[str, list[np.ndarray]]], *, val_fraction: float = 0.1,
                 sample_tokens: int = 512) -> Path:
    """A shard-stage output: each group's train and val documents ({group: {split: docs}}; group "" = no
    mixture), by the real ShardWriter; the manifest records data.val_fraction as the shard stage does."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(VOCAB)
    for p, (group, splits) in enumerate(groups.items()):
        for split, docs in splits.items():
            w = ShardWriter(out, split, p, dtype=dtype, sample_tokens=sample_tokens, shard_bytes=8_000, group=group)
            for doc in docs:
                w.add_doc(doc, "synthetic")
            w.close()
    manifest = build_manifest(out, dtype=dtype, tokenizer_info={"vocab_size": VOCAB}, read_counts={}, per_source={},
                              config={"val_fraction": val_fraction})
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def docs_of(n: int, seed: int) -> list[np.ndarray]:
    return synthetic_docs(n, seed)  # 41-200 tokens each, ending with eos


# ---------------------------------------------------------------------------------------------
# item 6: validation uses what the split has; a split with no row is refused before training


def test_a_val_split_smaller_than_a_batch_is_validated(tmp_path):
    one = docs_of(1, 7)  # one val document of 40-200 tokens: fewer rows than one batch of 8
    shards = write_shards(tmp_path / "shard", {"": {"train": docs_of(20, 0), "val": one}})
    rows = (len(one[0]) - 1) // S
    assert 0 < rows < 8
    full = ShardLoader(shards, split="val", seq_len=S, batch_size=8).one_epoch()
    assert list(full) == []  # before: no batch, and validation divided 0 by 0
    got = list(ShardLoader(shards, split="val", seq_len=S, batch_size=8, partial=True).one_epoch())
    assert [b["input_ids"].shape for b in got] == [(rows, S)]
    assert torch.equal(got[0]["input_ids"].flatten(), torch.as_tensor(one[0][:rows * S]))  # the split's own rows
    # a stream with whole batches still ends with its remainder, and nothing is read twice
    many = write_shards(tmp_path / "many", {"": {"train": docs_of(20, 0), "val": docs_of(6, 8)}})
    batches = list(ShardLoader(many, split="val", seq_len=S, batch_size=3, partial=True, shuffle=False).one_epoch())
    stream = np.concatenate(docs_of(6, 8))
    assert sum(len(b["input_ids"]) for b in batches) == (len(stream) - 1) // S
    assert [len(b["input_ids"]) for b in batches[:-1]] == [3] * (len(batches) - 1)


def test_a_val_split_without_a_row_is_refused_naming_the_group(tmp_path):
    short = [np.asarray([5, 6, 7, 8, 9, 10, 11, 12, 13, 2])]  # 10 tokens: no row of S + 1
    shards = write_shards(tmp_path / "shard", {"web": {"train": docs_of(30, 0), "val": docs_of(3, 1)},
                                               "code": {"train": docs_of(30, 2), "val": short}})
    assert val_split_check(shards, groups=["web"], seq_len=S, world_size=2) is None
    with pytest.raises(ValueError) as e:
        val_split_check(shards, groups=["web", "code"], seq_len=S, world_size=1)
    msg = str(e.value)
    assert msg.startswith("data.mixture group 'code''s val split gives no validation row: it has 1 sample(s), "
                          "10 tokens"), msg
    assert "data.seq_len <= 9" in msg and "a larger data.val_fraction (now 0.1)" in msg, msg
    assert val_split_check(shards, groups=["web", "code"], seq_len=9, world_size=1) is None  # the value it named
    # the shard stage records the train documents a larger val_fraction moves first (split key, tokens):
    # with them, a val_fraction that gives a row is named
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["near_val"] = {"code": [[0.1234, 12], [0.2071, 40], [0.6, 900]]}
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"data.val_fraction=0.208 \(now 0.1; the shard stage runs again\)"):
        val_split_check(shards, groups=["code"], seq_len=S, world_size=1)  # 10 + 12 + 40 tokens >= 33
    with pytest.raises(ValueError, match=r"data.val_fraction=0.601 \(now 0.1"):
        val_split_check(shards, groups=["code"], seq_len=S, world_size=4)  # 4 ranks: 4 x 33 tokens for sure

    # two short samples: a row on one rank, none on two (each rank's stream holds one sample)
    pair = [np.asarray(list(range(5, 24)) + [2]), np.asarray(list(range(30, 49)) + [2])]  # 20 tokens each
    two = write_shards(tmp_path / "two", {"": {"train": docs_of(30, 0), "val": pair}}, sample_tokens=1)
    assert val_split_check(two, groups=[None], seq_len=S, world_size=1) is None
    with pytest.raises(ValueError, match=r"^the val split gives no validation row: it has 2 sample\(s\), 40 tokens, "
                                         r"dealt to 2 ranks \(the most one rank gets: 20 tokens\).*data.seq_len <= 19"):
        val_split_check(two, groups=[None], seq_len=S, world_size=2)

    # data.val_fraction=0: no val split, on purpose: validation is skipped, not refused
    none = write_shards(tmp_path / "none", {"": {"train": docs_of(30, 0)}}, val_fraction=0.0)
    assert "data.val_fraction=0.0" in val_split_check(none, groups=[None], seq_len=S, world_size=2)


def test_the_train_stage_refuses_it_before_any_rank_starts(tmp_path):
    from xlp.pipeline.core.registry import TRAIN
    from xlp.pipeline.stages.train import run

    run_dir = tmp_path / "run"
    short = [np.asarray([5, 6, 7, 8, 9, 10, 11, 12, 13, 2])]
    write_shards(run_dir / "shard", {"": {"train": docs_of(30, 0), "val": short}})
    cfg = load_config(TINY, [f"run.dir={run_dir}", f"data.seq_len={S}", "train.cpu_processes=2", "model.vocab_size=64"])
    ctx = StageContext(name="train", cfg=TRAIN.view(cfg), run_dir=run_dir, fingerprint="t")
    with pytest.raises(ValueError, match=r"the val split gives no validation row: .*data.seq_len <= 9"):
        run(ctx)
    assert not (run_dir / "train" / "logs").exists()  # no rank was started


@pytest.mark.slow
def test_two_ranks_validate_groups_of_one_val_sample(tmp_path):
    """Each group's one val sample lands in rank 0's stream; rank 1 has no val row and contributes
    nothing: val/loss is the mean over rank 0's rows (before: 0 batches on every rank, val/loss nan)."""
    from xlp.xlstm_model import load_model

    val = {"a": docs_of(1, 11), "b": docs_of(1, 12)}
    shards = write_shards(tmp_path / "shard", {g: {"train": docs_of(60, i), "val": val[g]} for i, g in enumerate("ab")})
    mixture = "data.mixture={a: {sources: [x], weight: 0.5}, b: {sources: [y], weight: 0.5}}"
    run_dir = tmp_path / "run"
    result = train(run_dir, shards, [mixture, "train.steps=2", "train.eval_every=2", "train.eval_batches=0",
                                     "train.micro_batch_size=8", "data.streams=2", "train.save_every=0"])
    logged = {json.loads(line)["step"]: json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()}
    model = load_model(run_dir / "train" / "model").eval()
    sums = {}
    for g in "ab":
        x = torch.as_tensor(val[g][0], dtype=torch.int64)
        rows = (len(x) - 1) // S
        inp = x[:rows * S].view(rows, S)
        tgt = x[1:rows * S + 1].view(rows, S)
        starts = torch.zeros(rows, S, dtype=torch.bool)
        starts[:, 0] = True
        with torch.no_grad():
            loss = float(model(inp, doc_starts=starts, targets=tgt))
        sums[g] = (loss * rows * S, rows * S)
        assert logged[2][f"val/loss/{g}"] == pytest.approx(loss, rel=1e-4), g
    want = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    assert logged[2]["val/loss"] == pytest.approx(want, rel=1e-4)
    assert math.isfinite(result["val_loss"]) and result["val_loss"] == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# item 10: small corpora work with the defaults; what cannot work is refused before the stage that costs


def test_fewer_train_samples_than_streams(tmp_path):
    # 3 train samples (one document each), 8 streams: before, "loader stream 3 of 8 gets no samples"
    shards = write_shards(tmp_path / "three", {"": {"train": docs_of(3, 0), "val": docs_of(2, 1)}}, sample_tokens=1)

    def rows(world: int, steps: int = 12) -> dict[int, torch.Tensor]:
        got = {}
        for rank in range(world):
            loader = GlobalLoader(shards, seq_len=8, micro_batch_size=4 // world, rows_per_step=4, rank=rank,
                                  world_size=world, streams=8)
            for b in itertools.islice(loader, steps):
                got.update(zip(b["rows"].tolist(), b["input_ids"]))
        return got

    one, two = rows(1), rows(2)
    assert sorted(one) == sorted(two) == list(range(48))
    assert all(torch.equal(one[i], two[i]) for i in one)  # still one order, whatever the ranks
    loader = GlobalLoader(shards, seq_len=8, micro_batch_size=4, rows_per_step=4, streams=8)
    assert loader.group_streams == [3]
    assert loader.fewer_streams() == ["the train split has 3 samples: read as 3 streams, not data.streams=8"]
    mixed = GlobalLoader(write_shards(tmp_path / "mix", {"web": {"train": docs_of(40, 0)}, "code": {"train": docs_of(2, 1)}},
                                      sample_tokens=1),
                         seq_len=8, micro_batch_size=4, rows_per_step=4, streams=8,
                         mixture=Mixture.from_config({"web": {"sources": ["x"]}, "code": {"sources": ["y"]}}, []))
    assert mixed.group_streams == [8, 2]  # only the small group has fewer
    assert len(list(itertools.islice(mixed, 30))) == 30


def xlp_refused(*args: str, run_dir: Path) -> str:
    r = subprocess.run([*XLP, "run", str(TINY), f"run.dir={run_dir}", *args], env=xlp_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert not run_dir.exists(), "refused before anything ran"
    return r.stderr


def test_settings_that_cannot_work_are_refused_before_the_first_stage(tmp_path):
    err = xlp_refused("data.val_fraction=0", run_dir=tmp_path / "a")
    assert ("xlp run: error: data.val_fraction=0 makes no val split, and the eval stage's parts ppl, long_context, "
            "lm_eval read it: set data.val_fraction=0.01 (the default), or run eval.parts=[generation, recall]") in err, err
    err = xlp_refused("tokenizer.vocab_size=10000000", run_dir=tmp_path / "b")
    assert ("tokenizer.vocab_size=10000000 asks for more pieces than the 8388608 bytes of text they are learnt from "
            "(tokenizer.sample_bytes): set tokenizer.vocab_size well below that (e.g. 8000)") in err, err
    # without the eval stage, a run without a val split is fine (its validation is skipped)
    cfg = load_config(TINY, ["data.val_fraction=0"])
    check_run(cfg, ["tokenizer", "shard", "train"])
    with pytest.raises(ConfigError, match=r"or run no eval stage"):
        check_run(load_config(TINY, ["data.val_fraction=0", "eval.parts=[ppl]"]), ["eval"])


def test_a_vocabulary_larger_than_the_corpus_is_refused_before_sampling(tmp_path):
    from xlp.pipeline.core.registry import TOKENIZER
    from xlp.pipeline.stages.tokenizer import run

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "data.sources=[stdlib:json]", "tokenizer.vocab_size=2000000",
                             "tokenizer.sample_bytes=1000000000"])
    ctx = StageContext(name="tokenizer", cfg=TOKENIZER.view(cfg), run_dir=tmp_path, fingerprint="t")
    with pytest.raises(ValueError, match=r"^tokenizer.vocab_size=2000000 asks for more pieces than the corpus's \d+ "
                                         r"bytes of text \(data.sources\) can give: set tokenizer.vocab_size=\d+") as e:
        run(ctx)  # raised before the Ray tasks that sample (none is started: no Ray here)
    from xlp import tokenizer as tk

    suggested = int(re.search(r"set tokenizer.vocab_size=(\d+)", str(e.value)).group(1))
    docs = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]  # what stdlib:json reads
    assert tk.train(docs, vocab_size=suggested, num_threads=1).vocab_size == suggested  # the value it names works


def test_a_micro_batch_that_cannot_fit_memory_is_refused_before_the_ranks(tmp_path):
    """`data.seq_len=20000` on configs/tiny.yaml (2 CPU ranks): before, the ranks grew until Ray's memory
    monitor killed them, naming no key. Here with a machine of 16 GiB available (deterministic), then
    through the train stage with a length no machine holds."""
    from xlp.pipeline.core.registry import TRAIN
    from xlp.pipeline.stages.train import run
    from xlp.pipeline.train.memory import GiB, refuse_if_it_cannot_fit

    tok = tmp_path / "no-tokenizer"  # model.vocab_size is set: no tokenizer read
    cfg = load_config(TINY, ["data.seq_len=20000", "model.vocab_size=512"])
    with pytest.raises(ValueError) as e:
        refuse_if_it_cannot_fit(cfg, tok, ranks=2, available=16 * GiB)
    msg = str(e.value)
    assert msg.startswith("train.micro_batch_size=4 rows of data.seq_len=20000 tokens cannot fit this machine's "
                          "memory: 2 rank(s) x ("), msg
    assert "16.0 GiB is available. Set train.micro_batch_size=" in msg and "model.activation_checkpointing=true" in msg
    rows = int(re.search(r"train.micro_batch_size=(\d+) \(", msg).group(1))
    seq = int(re.search(r"data.seq_len=(\d+),", msg).group(1))
    assert 1 <= rows < 4 and 64 <= seq < 20000
    for fix in (f"train.micro_batch_size={rows}", f"data.seq_len={seq}", "model.activation_checkpointing=true"):
        refuse_if_it_cannot_fit(load_config(TINY, ["data.seq_len=20000", "model.vocab_size=512", fix]), tok,
                                ranks=2, available=16 * GiB)  # each value it names fits
    refuse_if_it_cannot_fit(load_config(TINY, ["model.vocab_size=512"]), tok, ranks=2, available=16 * GiB)

    run_dir = tmp_path / "run"
    write_shards(run_dir / "shard", {"": {"train": docs_of(30, 0), "val": docs_of(3, 1)}})
    cfg = load_config(TINY, [f"run.dir={run_dir}", "data.seq_len=4000000", "model.vocab_size=512",
                             "train.cpu_processes=2", "train.device=cpu"])
    ctx = StageContext(name="train", cfg=TRAIN.view(cfg), run_dir=run_dir, fingerprint="t")
    with pytest.raises(ValueError, match=r"^train.micro_batch_size=4 rows of data.seq_len=4000000 tokens cannot fit"):
        run(ctx)
    assert not (run_dir / "train" / "logs").exists()  # no rank was started


@pytest.mark.slow
def test_stdlib_json_runs_with_the_tiny_defaults(tmp_path):
    """README's small real corpus: `xlp run configs/tiny.yaml 'data.sources=[stdlib:json]'` (5 documents).
    Before: no document hashed into the val split, and the train ranks failed ("loader stream 6 of 8 gets
    no samples"). Here (a small model, 4 steps): its document with the smallest split key goes to val,
    4 train samples are read as 4 streams, and it trains and validates."""
    from test_continue import xlp

    run = tmp_path / "json"
    r = xlp("run", str(TINY), "data.sources=[stdlib:json]", f"run.dir={run}", "model.d_model=32", "model.num_blocks=2",
            "model.num_heads=2", "model.slstm_at=[1]", "model.slstm_num_heads=2", "train.steps=4", "train.eval_every=4",
            "train.save_every=4", "wandb.mode=disabled", "--stages", "tokenizer,shard,train")
    shard = json.loads((run / "shard" / "stage.json").read_text())["metrics"]
    assert shard["val_docs"] == 1 and shard["train_docs"] == shard["docs_kept"] - 1 and list(shard["val_forced"]) == [""]
    assert "the corpus got no val document at data.val_fraction=0.1: its train document with the smallest split key" \
        in r.stdout, r.stdout[-3000:]
    samples = json.loads((run / "shard" / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert samples < 8 and f"data: the train split has {samples} samples: read as {samples} streams, not " \
        "data.streams=8" in r.stdout, r.stdout[-3000:]
    train = json.loads((run / "train" / "stage.json").read_text())
    assert train["status"] == "done" and math.isfinite(train["metrics"]["val_loss"])
