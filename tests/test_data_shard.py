"""The tokenizer and shard stages on real text with real Ray: counts, tokens, determinism, resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from xlp import tokenizer as tk
from xlp.pipeline.core.config import load_config
from xlp.pipeline.data.readers import DataError, ReadStats, doc_hash, hash_unit, iter_documents, resolve_sources
from xlp.pipeline.data.shards import MANIFEST, read_shard
from xlp.pipeline.core.stage import StageContext
from xlp.pipeline.core.registry import STAGES
from xlp.pipeline.stages import shard as shard_stage
from xlp.pipeline.stages import tokenizer as tok_stage

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def copy_py(dst: Path, subs, max_bytes: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for sub in subs:
        for p in sorted((STDLIB / sub).glob("*.py")):
            shutil.copy(p, dst / f"{sub}_{p.name}")
            n += p.stat().st_size
            if n >= max_bytes:
                return


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    copy_py(root / "py", ("json", "http", "logging"), 250_000)
    recs = [{"text": f"record number {i}: " + "word " * (i % 7)} for i in range(60)]
    recs += [{"text": "a duplicated document\n"}] * 3 + [{"text": ""}]
    (root / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def ray_here():
    """An embedded Ray of our own: address="local" never joins a cluster someone started with `ray start`."""
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    yield ray
    if started:
        ray.shutdown()


BASE = ["tokenizer.vocab_size=700", "tokenizer.sample_bytes=200000", "data.partition_bytes=65536",
        "data.shard_bytes=16384", "data.sample_tokens=512", "data.val_fraction=0.1"]


def sources(corpus: Path) -> list[str]:
    return [f"data.sources=[{corpus / 'py'},{corpus / 'recs.jsonl'},{corpus / 'empty.txt'},{corpus / 'latin1.txt'}]"]


def run_stage(name: str, run_dir: Path, overrides: list[str], resumed: bool = False) -> dict:
    cfg = load_config(None, overrides)
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=name, cfg=cfg, run_dir=run_dir, fingerprint="test", resumed=resumed)
    return {"tokenizer": tok_stage.run, "shard": shard_stage.run}[name](ctx)


def shard_hashes(run_dir: Path) -> list[tuple[str, str]]:
    m = json.loads((run_dir / "shard" / MANIFEST).read_text())
    return [(s["path"], s["sha256"]) for s in m["shards"]]


@pytest.fixture(scope="module")
def run1(ray_here, corpus, tmp_path_factory) -> tuple[Path, dict, dict]:
    run_dir = tmp_path_factory.mktemp("run1")
    ov = sources(corpus) + BASE
    tm = run_stage("tokenizer", run_dir, ov)
    sm = run_stage("shard", run_dir, ov)
    return run_dir, tm, sm


def direct_docs(corpus: Path) -> list[tuple[str, str]]:
    """(source, text) of every non-empty document, read without Ray."""
    stats = ReadStats()
    srcs = [str(corpus / "py"), str(corpus / "recs.jsonl"), str(corpus / "empty.txt"), str(corpus / "latin1.txt")]
    return [(f.source, d) for f in resolve_sources(srcs, stats=stats)
            for d in iter_documents(f, stats=stats)]


def test_stages_registered():
    by_name = {s.name: s for s in STAGES}
    assert [s.name for s in STAGES][:2] == ["tokenizer", "shard"]
    assert by_name["tokenizer"] is tok_stage.STAGE and by_name["shard"] is shard_stage.STAGE
    assert by_name["shard"].needs == ("tokenizer",) and by_name["shard"].resumable


def test_tokenizer_stage(run1):
    run_dir, tm, _ = run1
    tok = tk.load(run_dir / "tokenizer" / "tokenizer.model")
    assert tok.vocab_size == 700 and tm["vocab_size"] == 700
    stats = json.loads((run_dir / "tokenizer" / "stats.json").read_text())
    assert stats["specials"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert 1.5 < tm["chars_per_token"] < 6 and tm["heldout_docs"] > 0
    assert 0 < tm["sample_docs"] < tm["docs_kept"]
    assert tm["docs_empty"] == 2 and tm["replacement_chars"] == 4  # empty.txt + the "" record; latin-1 bytes
    assert (run_dir / "tokenizer" / "tokenizer.vocab").read_text().startswith("<pad>\t0\n")


def test_manifest_tokens_equal_direct_encoding(run1, corpus):
    run_dir, _, sm = run1
    tok = tk.load(run_dir / "tokenizer" / "tokenizer.model")
    docs = direct_docs(corpus)
    expect = {"train": [], "val": []}
    for _, text in docs:
        expect["val" if hash_unit(doc_hash(text)) < 0.1 else "train"].append(tok.encode(text) + [tok.eos_id])
    m = json.loads((run_dir / "shard" / MANIFEST).read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["eos_id"] == tok.eos_id
    assert m["tokens"] == sum(len(ids) for ids in expect["train"] + expect["val"]) == sm["tokens"]
    for split in ("train", "val"):
        assert m["splits"][split]["docs"] == len(expect[split]) > 0
        assert m["splits"][split]["tokens"] == sum(map(len, expect[split]))
        got = []
        for s in (s for s in m["shards"] if s["split"] == split):
            data = (run_dir / "shard" / s["path"]).read_bytes()
            samples = read_shard(data, np.dtype("<u2"))
            assert len(samples) == s["samples"] and sum(len(t) for _, t, _ in samples) == s["tokens"]
            for _, tokens, lens in samples:
                assert lens.sum() == len(tokens)
                got.extend(part.tolist() for part in np.split(tokens, np.cumsum(lens)[:-1]))
        assert got == expect[split]  # source order within a split, documents whole, each ending with eos
    assert sm["docs_read"] == len(docs) + 2 and sm["docs_empty"] == 2 and sm["docs_kept"] == len(docs)
    assert sm["replacement_chars"] == 4 and sm["files_skipped"] == 0 and sm["bad_records"] == 0
    per = m["sources"][str(corpus / "recs.jsonl")]
    assert per["docs_read"] == 64 and per["docs_empty"] == 1 and per["docs_written"] == 63
    assert sum(s["tokens"] for s in m["sources"].values()) == m["tokens"]


def test_shards_are_webdataset(run1):
    import webdataset as wds

    run_dir, _, _ = run1
    m = json.loads((run_dir / "shard" / MANIFEST).read_text())
    first = m["shards"][0]
    samples = list(wds.WebDataset(str(run_dir / "shard" / first["path"]), shardshuffle=False))
    assert len(samples) == first["samples"]
    assert set(samples[0]) >= {"__key__", "tokens.npy", "doclens.npy"}
    # webdataset's own decoder reads the members as NumPy arrays: no project code involved
    decoded = list(wds.WebDataset(str(run_dir / "shard" / first["path"]), shardshuffle=False).decode())
    assert sum(len(s["tokens.npy"]) for s in decoded) == first["tokens"]
    assert all(s["doclens.npy"].sum() == len(s["tokens.npy"]) for s in decoded)
    assert decoded[0]["tokens.npy"].dtype == np.uint16


def test_readme_webdataset_snippet_reads_our_shards_without_our_code(run1, tmp_path):
    """README's 5-line snippet, as written there, in a fresh interpreter that imports none of our code."""
    run_dir, _, _ = run1
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- webdataset-snippet -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    snippet = "\n".join(line[2:] for line in block.strip("\n").splitlines())  # the list item's indent
    shard = sorted((run_dir / "shard").glob("train-*.tar"))[0]
    code = snippet.replace("runs/demo/shard/train-00000-0000.tar", str(shard)) + (
        "\nimport sys\nassert not {'pipeline', 'tokenizer', 'xlstm_model'} & {m.split('.')[0] for m in sys.modules}\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((run_dir / "shard" / MANIFEST).read_text())
    record = next(s for s in m["shards"] if s["path"] == shard.name)
    lines = r.stdout.splitlines()
    assert len(lines) == record["samples"]
    assert sum(int(line.split()[1]) for line in lines) == record["docs"]
    assert sum(int(line.split()[3]) for line in lines) == record["tokens"]


def test_version_1_shards_still_read():
    """A v1 shard (raw little-endian members `KEY.tokens`, `KEY.doclens`) reads as before."""
    import io
    import tarfile

    tokens, lens = np.arange(7, dtype="<u2"), np.asarray([3, 4], dtype="<u4")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("train-00000-00000000.tokens", tokens.tobytes()), ("train-00000-00000000.doclens", lens.tobytes())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    [(key, got_tokens, got_lens)] = read_shard(buf.getvalue(), np.dtype("<u2"))
    assert key == "train-00000-00000000" and got_tokens.tolist() == tokens.tolist() and got_lens.tolist() == [3, 4]


def test_two_runs_identical(run1, corpus, tmp_path):
    run_dir, _, _ = run1
    shutil.copytree(run_dir / "tokenizer", tmp_path / "tokenizer")
    again = run_stage("shard", tmp_path, sources(corpus) + BASE + ["data.num_workers=1"])
    assert shard_hashes(tmp_path) == shard_hashes(run_dir)
    assert (tmp_path / "shard" / MANIFEST).read_bytes() == (run_dir / "shard" / MANIFEST).read_bytes()
    assert again["shards_written"] == len(shard_hashes(run_dir))
    # a second tokenizer training on the same input gives the same model
    run_stage("tokenizer", tmp_path / "t2", sources(corpus) + BASE)
    assert (tmp_path / "t2" / "tokenizer" / "tokenizer.model").read_bytes() == \
        (run_dir / "tokenizer" / "tokenizer.model").read_bytes()


KILL_SCRIPT = r"""
import json, sys, ray
from pathlib import Path
from xlp.pipeline.core.config import load_config
from xlp.pipeline.core.stage import StageContext
from xlp.pipeline.stages.shard import run
run_dir, overrides, address = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
ray.init(address=address, log_to_driver=False)  # a second driver on the test's Ray: starts fast
ctx = StageContext(name="shard", cfg=load_config(None, overrides), run_dir=run_dir, fingerprint="k")
run(ctx)
print("FINISHED", flush=True)
"""


@pytest.mark.slow  # Ray shard tasks killed mid-run, then the rerun
def test_kill_and_resume_writes_only_missing_shards(ray_here, tmp_path):
    corpus = tmp_path / "big"
    copy_py(corpus, ("email", "json", "http", "asyncio"), 900_000)
    ov = [f"data.sources=[{corpus}]", "tokenizer.vocab_size=700", "tokenizer.sample_bytes=150000",
          "data.partition_bytes=200000", "data.shard_bytes=4096", "data.sample_tokens=256",
          "data.val_fraction=0.05", "data.num_workers=1"]
    ref = tmp_path / "ref"
    run_stage("tokenizer", ref, ov)
    run_stage("shard", ref, ov)
    expected = shard_hashes(ref)
    n = len(expected)
    assert n > 30

    killed = tmp_path / "killed"
    shutil.copytree(ref / "tokenizer", killed / "tokenizer")
    (killed / "shard").mkdir()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(killed), json.dumps(ov),
                             ray_here.get_runtime_context().gcs_address], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if len(list((killed / "shard").glob("*.tar"))) >= n // 3:
                break
            assert proc.poll() is None, f"the shard stage ended before it could be killed: {proc.communicate()}"
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's driver: Ray then kills its tasks' workers
        proc.communicate()
    print(f"killed after {time.time() - t0:.1f}s")
    time.sleep(1.0)
    assert not (killed / "shard" / MANIFEST).exists()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (killed / "shard").glob("*.tar")}
    assert n // 3 <= len(before) < n
    time.sleep(1.0)
    assert len(list((killed / "shard").glob("*.tar"))) == len(before)  # nothing still writing

    m = run_stage("shard", killed, ov, resumed=True)
    assert shard_hashes(killed) == expected
    assert m["shards_written"] == n - len(before)
    assert m["shards_kept"] == len(before)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (killed / "shard").glob("*.tar")}
    assert all(after[name] == v for name, v in before.items())  # finished shards were not rewritten
    assert not list((killed / "shard").glob(".*.tmp"))
    assert (killed / "shard" / MANIFEST).read_bytes() == (ref / "shard" / MANIFEST).read_bytes()


def test_bad_input_skip_counts_and_fail_names(ray_here, corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine one"}\n{"text": oops}\n{"text": "fine two"}\n')
    missing = tmp_path / "missing.txt"
    ov = [f"data.sources=[{corpus / 'recs.jsonl'},{bad},{missing},{corpus / 'latin1.txt'}]",
          "tokenizer.vocab_size=300", "data.val_fraction=0.0"]
    with pytest.raises(DataError, match="missing.txt"):
        run_stage("tokenizer", tmp_path / "fail", ov)
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_stage("tokenizer", tmp_path / "fail", ov[:1] + ov[1:] + [f"data.sources=[{bad}]"])
    ov_skip = ov + ["data.on_error=skip"]
    run_stage("tokenizer", tmp_path / "skip", ov_skip)
    m = run_stage("shard", tmp_path / "skip", ov_skip)
    assert m["files_skipped"] == 1 and m["skipped_files"][0]["path"] == str(missing)
    assert m["bad_records"] == 1 and m["bad_record_list"][0] == {"path": str(bad), "line": 2,
                                                                 "reason": m["bad_record_list"][0]["reason"]}
    assert m["docs_read"] == 64 + 2 + 1 and m["docs_empty"] == 1 and m["replacement_chars"] == 4
    assert m["docs_kept"] == m["train_docs"] == 66 and m["val_docs"] == 0


def test_dedup(ray_here, corpus, tmp_path):
    ov = [f"data.sources=[{corpus / 'recs.jsonl'},{corpus / 'recs.jsonl'}]", "tokenizer.vocab_size=300",
          "data.dedup=true", "data.partition_bytes=1000"]
    run_stage("tokenizer", tmp_path, ov)
    m = run_stage("shard", tmp_path, ov)
    tok = tk.load(tmp_path / "tokenizer" / "tokenizer.model")
    unique = list(dict.fromkeys(json.loads(line)["text"] for line in (corpus / "recs.jsonl").read_text().splitlines()))
    unique = [u for u in unique if u.strip()]
    assert m["docs_read"] == 128 and m["docs_empty"] == 2
    assert m["docs_kept"] == len(unique) == 61 and m["docs_duplicate"] == 128 - 2 - 61
    assert m["tokens"] == sum(len(tok.encode(u)) + 1 for u in unique)
