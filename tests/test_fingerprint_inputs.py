"""Stage fingerprints see their inputs: the corpus files (path, size, mtime), the content of
tokenizer.path and of the model.init_from checkpoint. Fast tests check the listings on real files
(and that no data is read to make them); the slow ones run the real pipeline (`xlp run`, Ray,
SentencePiece) and check what reruns."""
from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import load_config
from xlp.pipeline.data import listing
from xlp.pipeline.data.readers import resolve_sources
from xlp.pipeline.core.stage import fingerprint, fingerprints, input_digests, trajectories
from xlp.pipeline.core.registry import STAGES
from test_data_shard import copy_py

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = REPO / "configs" / "tiny.yaml"




def cfg_for(tmp_path: Path, *sources, overrides=()):
    src = ",".join(str(s) for s in sources)
    return load_config(None, [f"data.sources=[{src}]", f"run.dir={tmp_path / 'run'}", *overrides])


def changed(before: dict, after: dict) -> set[str]:
    return {s for s in before if before[s] != after[s]}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    copy_py(root, ("json",), 40_000)
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("some notes\n")
    return root


# ---------------------------------------------------------------------------------------------
# Listings (fast)


def test_listing_is_the_files_the_readers_read(corpus):
    (corpus / ".hidden.txt").write_text("not read\n")
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "x.pyc").write_bytes(b"\0")
    entry = listing.list_source(str(corpus))
    paths = [f[0] for f in entry["files"]]
    assert paths == [ref.url for ref in resolve_sources([str(corpus)])]
    assert len(paths) >= 3 and not any(".hidden" in p or "__pycache__" in p for p in paths)
    for path, size, mtime_ns in entry["files"]:
        st = os.stat(path)
        assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns)
    # a glob and a file:// URL list the same way the readers expand them
    glob_paths = [f[0] for f in listing.list_source(str(corpus / "*.py"))["files"]]
    assert glob_paths == [ref.url for ref in resolve_sources([str(corpus / "*.py")])] and glob_paths
    assert [f[0] for f in listing.list_source(f"file://{corpus}")["files"]] == paths


def test_no_data_is_read_to_decide(corpus, tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, corpus, "stdlib:json")
    expected = fingerprints(STAGES, cfg)

    def no_open(*a, **k):
        raise AssertionError(f"opened {a[0] if a else k} while deciding")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    assert fingerprints(STAGES, cfg) == expected


def test_added_edited_touched_removed_files_change_the_data_stages(corpus, tmp_path):
    cfg = cfg_for(tmp_path, corpus)
    base = fingerprints(STAGES, cfg)
    assert fingerprints(STAGES, cfg) == base  # touching nothing changes nothing

    (corpus / "added.txt").write_text("a new document\n")
    added = fingerprints(STAGES, cfg)
    assert changed(base, added) == {"tokenizer", "shard", "train", "eval"}  # the data stages and downstream

    victim = corpus / "sub" / "notes.txt"
    st = victim.stat()
    victim.write_text("other notes\n")  # same size, new content: the mtime tells
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    edited = fingerprints(STAGES, cfg)
    assert changed(added, edited) == {"tokenizer", "shard", "train", "eval"}

    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # touched only
    assert changed(edited, fingerprints(STAGES, cfg)) == {"tokenizer", "shard", "train", "eval"}

    (corpus / "added.txt").unlink()
    assert fingerprints(STAGES, cfg) != added


def test_listings_are_made_once_per_call(corpus, tmp_path, monkeypatch):
    calls = []
    real = listing.corpus
    monkeypatch.setattr(listing, "corpus", lambda cfg: calls.append(1) or real(cfg))
    cfg = cfg_for(tmp_path, corpus)
    fingerprints(STAGES, cfg)
    assert len(calls) == 1  # tokenizer and shard share one listing
    trajectories(STAGES, cfg)
    assert len(calls) == 2
    digests = input_digests(STAGES, cfg)
    assert len(calls) == 3
    fingerprints(STAGES, cfg, inputs=digests)
    trajectories(STAGES, cfg, inputs=digests)
    assert len(calls) == 3


def test_stdlib_listing_names_the_interpreter_and_its_files():
    entry = listing.list_source("stdlib:json")
    assert entry["python"].split()[-1] == ".".join(map(str, sys.version_info[:3]))
    names = [f[0] for f in entry["files"]]
    assert "json/__init__.py" in names and all(not os.path.isabs(n) for n in names)
    assert all(size == (STDLIB / n).stat().st_size for n, size in entry["files"])


def test_fsspec_url_listing_reports_the_store_and_sees_a_replaced_object():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/xlp-listing/a.txt": b"alpha\n", "/xlp-listing/b.txt": b"beta\n", "/xlp-listing/.h": b"x"})
    try:
        entry = listing.list_source("memory://xlp-listing")
        readers = [r.url.split("://", 1)[-1] for r in resolve_sources(["memory://xlp-listing"])]
        assert [p for p, _ in entry["files"]] == readers
        assert [info["size"] for _, info in entry["files"]] == [6, 5]
        fs.pipe("/xlp-listing/b.txt", b"beta, longer\n")
        assert listing.list_source("memory://xlp-listing") != entry
    finally:
        fs.rm("/xlp-listing", recursive=True)


def test_hf_missing_and_unreadable_sources_are_listed_not_raised(tmp_path):
    hf = listing.list_source("hf://some/dataset:validation")
    assert hf["dataset"] == "some/dataset" and hf["split"] == "validation"  # no network, no download
    missing = listing.list_source(str(tmp_path / "nowhere"))
    assert "nowhere" in missing["error"]
    cfg = cfg_for(tmp_path, tmp_path / "nowhere")
    assert set(fingerprints(STAGES, cfg)) == {"tokenizer", "shard", "train", "eval"}  # status still works


def test_tokenizer_path_content_is_hashed(tmp_path):
    model = tmp_path / "tok.model"
    model.write_bytes(b"model one")
    cfg = load_config(None, ["data.sources=[stdlib:json]", f"tokenizer.path={model}"])
    base = fingerprints(STAGES, cfg)
    assert listing.tokenizer_file(cfg)["sha256"] == listing.sha256_file(model)
    st = model.stat()
    model.write_bytes(b"model two")  # same size, same mtime: only the content differs
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = fingerprints(STAGES, cfg)
    assert changed(base, after) == {"tokenizer", "shard", "train", "eval"}
    assert listing.tokenizer_file(load_config(None, [])) is None


def test_init_from_checkpoint_is_listed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"a": 1}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    small = listing.tree_identity(ckpt, small=16)["files"]
    assert small[0][0] == "config.json" and small[0][2] == listing.sha256_file(ckpt / "config.json")
    assert small[1][:2] == ["model.safetensors", 64] and small[1][2] == (ckpt / "model.safetensors").stat().st_mtime_ns

    stage = next(s for s in STAGES if s.name == "train")
    cfg = load_config(None, [f"model.init_from=native:{ckpt}"])
    base = fingerprint(stage, cfg, {"tokenizer": "t", "shard": "s"})
    (ckpt / "config.json").write_text('{"a": 2}')  # same size: the content hash tells
    assert fingerprint(stage, cfg, {"tokenizer": "t", "shard": "s"}) != base
    assert listing.init_from(load_config(None, [])) is None


# ---------------------------------------------------------------------------------------------
# The real pipeline (slow: Ray, SentencePiece, the tokenizer and shard stages)


def xlp_run(run_dir: Path, *overrides: str) -> dict[str, str]:
    """`xlp run configs/tiny.yaml --stages tokenizer,shard`: what each stage did (ran | skipped)."""
    proc = subprocess.run(XLP + ["run", str(TINY), "--stages", "tokenizer,shard", "--run-dir", str(run_dir),
                                 "data.num_workers=1", *overrides],
                          env=xlp_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"xlp run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    did = {}
    for line in proc.stdout.splitlines():
        for stage in ("tokenizer", "shard"):
            if line.startswith(f"> {stage}:"):
                did[stage] = "ran"
            elif line.startswith(f"= {stage}:"):
                did[stage] = "skipped"
    return did


def xlp_status(run_dir: Path) -> dict[str, str]:
    """Each stage's status as the `xlp status` table shows it (done | stale | ...). (Its --json output
    merges the stage.json marker over the computed status, so a stale stage reads "done" there.)"""
    proc = subprocess.run(XLP + ["status", str(run_dir)], env=xlp_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) >= 2 and r[0] in ("tokenizer", "shard", "train", "eval")}


@pytest.mark.slow
def test_pipeline_reruns_the_data_stages_when_the_corpus_changes(tmp_path):
    corpus = tmp_path / "corpus"
    copy_py(corpus, ("json", "email"), 120_000)
    run_dir = tmp_path / "run"
    src = f"data.sources=[{corpus}]"
    assert xlp_run(run_dir, src) == {"tokenizer": "ran", "shard": "ran"}
    assert xlp_run(run_dir, src) == {"tokenizer": "skipped", "shard": "skipped"}  # touching nothing reruns nothing

    shutil.copy(STDLIB / "textwrap.py", corpus / "added_textwrap.py")
    assert xlp_run(run_dir, src) == {"tokenizer": "ran", "shard": "ran"}
    assert xlp_status(run_dir)["shard"] == "done"

    edited = sorted(corpus.glob("json_*.py"))[0]
    edited.write_text(edited.read_text() + "\n# one more line\n")
    status = xlp_status(run_dir)
    assert (status["tokenizer"], status["shard"]) == ("stale", "stale")


@pytest.mark.slow
def test_pipeline_reruns_when_the_tokenizer_file_is_replaced(tmp_path):
    from xlp import tokenizer as tk

    texts = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
    one = tk.train(texts, vocab_size=400, seed=0)
    two = tk.train(texts, vocab_size=440, seed=0)
    model = tmp_path / "given.model"
    one.save(model)
    run_dir = tmp_path / "run"
    overrides = (f"tokenizer.path={model}", "data.sources=[stdlib:json]")
    assert xlp_run(run_dir, *overrides) == {"tokenizer": "ran", "shard": "ran"}
    assert xlp_status(run_dir)["shard"] == "done"

    two.save(tmp_path / "new.model")
    os.replace(tmp_path / "new.model", model)  # same path, other model
    assert xlp_run(run_dir, *overrides) == {"tokenizer": "ran", "shard": "ran"}
    assert json.loads((run_dir / "tokenizer" / "stats.json").read_text())["sha256"] == two.sha256
    assert xlp_status(run_dir)["shard"] == "done"


def test_data_on_error_is_in_the_train_fingerprint_and_continues_its_trajectory(tmp_path):
    """The trainer reads data.on_error (a damaged shard fails the run, or is left out): the key is in the
    train stage's fingerprint, and, as a continues key, a run trained before it was hashed (or one that
    switches to skipping) continues from its checkpoints instead of training again."""
    train = next(s for s in STAGES if s.name == "train")
    base = load_config(TINY, [f"run.dir={tmp_path}"])
    skip = load_config(TINY, [f"run.dir={tmp_path}", "data.on_error=skip"])
    inputs = input_digests(STAGES, base)
    up = {k: v for k, v in fingerprints(STAGES, base, inputs=inputs).items() if k in train.needs}
    # the same upstream outputs: the key alone changes the train fingerprint, not its trajectory
    assert fingerprint(train, skip, up, inputs=inputs) != fingerprint(train, base, up, inputs=inputs)
    assert fingerprint(train, skip, up, trajectory=True, inputs=inputs) == \
        fingerprint(train, base, up, trajectory=True, inputs=inputs)
    # the trajectory leaves the key out entirely: the same hash as before the key was declared
    assert "data.on_error" in train.reads and "data.on_error" in train.continues


def test_fingerprints_of_runs_made_before_the_xlp_namespace_still_hold():
    """Run directories made before the rename to xlp.* keep their stages: the fingerprints of the tiny
    config (with fixed input digests and upstream fingerprints, so the values do not depend on this
    machine's files) are the ones the code at 8b04bd9 computed. Only the train fingerprint changed
    (data.on_error joined it), and its trajectory did not, so such a run continues its checkpoints."""
    cfg = load_config("tiny", ["run.dir=runs/tiny", "data.sources=[/corpus]"])
    by = {s.name: s for s in STAGES}
    inputs = {spec: "a" * 64 for s in STAGES for spec in s.inputs}
    up = {"tokenizer": "1" * 16, "shard": "2" * 16, "train": "3" * 16}
    got = {n: fingerprint(by[n], cfg, up, inputs=inputs) for n in by}
    got.update({n + "_trajectory": fingerprint(by[n], cfg, up, trajectory=True, inputs=inputs) for n in by})
    before = {"eval": "6a587d8045016773", "eval_trajectory": "349002dd9a4fd91d", "shard": "a64938c8688a02f0",
              "shard_trajectory": "a49a7bbc577b1c5a", "tokenizer": "aa50d3cafdf16578",
              "tokenizer_trajectory": "98d5019d6ca084bf", "train": "69b7ace0a716d11b",
              "train_trajectory": "1c9ed7ab5b6d605f"}  # computed by 8b04bd9's pipeline.stage.fingerprint
    assert {k: v for k, v in got.items() if k != "train"} == {k: v for k, v in before.items() if k != "train"}
    assert got["train"] != before["train"]  # data.on_error is hashed now; the trajectory above is the same


def test_a_key_added_later_is_hashed_only_when_set(tmp_path):
    """train.exp_decay_steps (the exp schedule's, added with a null default) is in the train fingerprint
    when set, and absent when null: runs made before it existed keep their fingerprints (the test above)."""
    train = next(s for s in STAGES if s.name == "train")
    base = load_config(TINY, [f"run.dir={tmp_path}"])
    inputs = input_digests(STAGES, base)
    up = {k: v for k, v in fingerprints(STAGES, base, inputs=inputs).items() if k in train.needs}
    exp = load_config(TINY, [f"run.dir={tmp_path}", "train.schedule=exp", "train.exp_decay_steps=15"])
    exp_null = load_config(TINY, [f"run.dir={tmp_path}", "train.schedule=exp"])
    got = {fingerprint(train, c, up, inputs=inputs) for c in (base, exp, exp_null)}
    assert len(got) == 3
    assert "train.exp_decay_steps" in train.added and "exp_decay_steps" in base.train
