"""Corpus readers: each format on small files made here, and bad input counted or failing by name."""
from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from xlp.pipeline.core.config import ConfigError, load_config
from xlp.pipeline.data.readers import (
    DataError,
    ReadStats,
    iter_documents,
    plan_partitions,
    resolve_sources,
    stdlib_files,
)


def read_all(sources, *, fmt="auto", on_error="fail", text_field="text"):
    stats = ReadStats()
    files = resolve_sources(sources, fmt=fmt, on_error=on_error, stats=stats)
    docs = [d for f in files for d in iter_documents(f, text_field=text_field, on_error=on_error, stats=stats)]
    return docs, stats


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document\nwith two lines\n")
    (d / "sub" / "b.py").write_text("def f():\n    return 1\n")
    (d / ".hidden").write_text("never read")
    (d / "empty.txt").write_bytes(b"")
    (d / "bad_utf8.txt").write_bytes(b"ok \xff\xfe bytes \xc3\x28 end")
    (d / "lines.txt").write_text("one\n\ntwo\r\nthree\n")
    recs = [{"text": "json one"}, {"text": "json two", "id": 2}, {"text": ""}, {"text": "json three"}]
    body = "".join(json.dumps(r) + "\n" for r in recs)
    (d / "docs.jsonl").write_text(body + "\n")  # a blank line at the end
    (d / "docs2.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (d / "docs3.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    (d / "text.txt.gz").write_bytes(gzip.compress(b"gzipped text document"))
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "n": [1, 2, 3]}), d / "t.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "nocol.parquet")
    (tmp_path / "malformed.jsonl").write_text('{"text": "good"}\n{"text": broken\n[1, 2]\n{"other": "x"}\n{"text": "last"}\n')
    (tmp_path / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    return tmp_path


def test_text_file_and_compressed(corpus):
    docs, stats = read_all([str(corpus / "corpus" / "a.txt"), str(corpus / "corpus" / "text.txt.gz")])
    assert docs == ["first document\nwith two lines\n", "gzipped text document"]
    t = stats.totals()
    assert t["files"] == 2 and t["docs_read"] == 2 and t["docs_empty"] == 0


def test_lines_format(corpus):
    docs, stats = read_all([str(corpus / "corpus" / "lines.txt")], fmt="lines")
    assert docs == ["one", "two", "three"]
    assert stats.totals()["docs_read"] == 4 and stats.totals()["docs_empty"] == 1


def test_jsonl_plain_gzip_zstd(corpus):
    for name in ("docs.jsonl", "docs2.jsonl.gz", "docs3.jsonl.zst"):
        docs, stats = read_all([str(corpus / "corpus" / name)])
        assert docs == ["json one", "json two", "json three"], name
        t = stats.totals()
        assert (t["docs_read"], t["docs_empty"], t["bad_records"]) == (4, 1, 0)
    assert read_all([str(corpus / "corpus" / "docs.jsonl")])[1].totals()["blank_lines"] == 1


def test_jsonl_text_field(corpus):
    p = corpus / "f.jsonl"
    p.write_text('{"content": "A"}\n{"content": "B"}\n')
    assert read_all([str(p)], text_field="content")[0] == ["A", "B"]


def test_parquet(corpus):
    docs, stats = read_all([str(corpus / "corpus" / "t.parquet")])
    assert docs == ["pq one", "pq two"]
    assert stats.totals()["docs_empty"] == 1  # the null


def test_directory_glob_and_url(corpus):
    d = corpus / "corpus"
    docs, stats = read_all([str(d)])
    files = resolve_sources([str(d)])
    names = [os.path.basename(f.url) for f in files]
    assert ".hidden" not in names and names[-1] == "b.py"  # sorted walk: files, then sub/
    assert {f.fmt for f in files} == {"text", "jsonl", "parquet"}
    t = stats.totals()
    assert t["files"] == len(files) == 10
    assert "def f():\n    return 1\n" in docs and "pq two" in docs and "json three" in docs
    g = resolve_sources([str(d / "**" / "*.py")])
    assert [os.path.basename(f.url) for f in g] == ["b.py"]
    url_docs, _ = read_all([f"file://{d}/a.txt", f"file://{d}/sub"])
    assert url_docs == ["first document\nwith two lines\n", "def f():\n    return 1\n"]


def test_stdlib_source():
    files = stdlib_files()
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or "__pycache__" in f for f in files)
    refs = resolve_sources(["stdlib"])
    assert len(refs) == len(files) and sum(r.size for r in refs) > 10_000_000
    parts = plan_partitions(refs, 4 << 20)
    assert sum(len(p) for p in parts) == len(refs) and len(parts) >= 3
    assert [r for p in parts for r in p] == refs
    # ceil(total / partition_bytes) partitions of about equal size: no small remainder last
    total = sum(r.size for r in refs)
    assert len(parts) == -(-total // (4 << 20))
    sizes = [sum(r.size for r in p) for p in parts]
    biggest_file = max(r.size for r in refs)
    assert max(sizes) - min(sizes) <= 2 * biggest_file and max(sizes) <= (4 << 20) + biggest_file


def test_a_file_bigger_than_a_partition_is_a_partition_of_its_own():
    from xlp.pipeline.data.readers import FileRef

    refs = [FileRef("s", f"f{i}", size, "text") for i, size in enumerate([10, 10, 500, 10, 10, 10])]
    parts = plan_partitions(refs, 100)
    assert [[r.url for r in p] for p in parts] == [["f0", "f1"], ["f2"], ["f3", "f4", "f5"]]
    assert plan_partitions([], 100) == [] and len(plan_partitions(refs, 1 << 30)) == 1


def test_stdlib_package_source():
    refs = resolve_sources(["stdlib:json"])
    names = sorted(os.path.basename(r.url) for r in refs)
    assert "decoder.py" in names and "encoder.py" in names and all(n.endswith(".py") for n in names)
    assert all(os.sep + "json" + os.sep in r.url for r in refs)
    with pytest.raises(DataError, match=r"stdlib:nonexistent_pkg.*no standard-library package"):
        resolve_sources(["stdlib:nonexistent_pkg"])


def test_invalid_utf8_replaced_and_counted(corpus):
    docs, stats = read_all([str(corpus / "corpus" / "bad_utf8.txt")])
    assert docs == ["ok \ufffd\ufffd bytes \ufffd( end"]
    assert stats.totals()["replacement_chars"] == 3


def test_valid_fffd_is_not_counted(corpus):
    p = corpus / "fffd.txt"
    p.write_bytes("real \ufffd char".encode() + b" and \xff")
    docs, stats = read_all([str(p)])
    assert docs[0].count("\ufffd") == 2 and stats.totals()["replacement_chars"] == 1


def test_empty_file_dropped_and_counted(corpus):
    docs, stats = read_all([str(corpus / "corpus" / "empty.txt")])
    assert docs == [] and stats.totals()["docs_read"] == 1 and stats.totals()["docs_empty"] == 1


def test_missing_path(corpus):
    missing = str(corpus / "nope" / "x.txt")
    with pytest.raises(DataError, match="nope/x.txt"):
        read_all([missing])
    with pytest.raises(DataError, match="matches no files"):
        read_all([str(corpus / "*.nothing")])
    docs, stats = read_all([missing, str(corpus / "corpus" / "a.txt")], on_error="skip")
    assert len(docs) == 1
    assert stats.totals()["files_skipped"] == 1 and stats.skipped[0]["path"] == missing


def test_malformed_jsonl(corpus):
    path = str(corpus / "malformed.jsonl")
    with pytest.raises(DataError, match=r"malformed\.jsonl:2: malformed JSONL"):
        read_all([path])
    docs, stats = read_all([path], on_error="skip")
    assert docs == ["good", "last"]
    assert stats.totals()["bad_records"] == 3
    assert [b["line"] for b in stats.bad_records] == [2, 3, 4]
    assert all(b["path"] == path for b in stats.bad_records)


def test_parquet_without_text_column(corpus):
    path = str(corpus / "nocol.parquet")
    with pytest.raises(DataError, match="nocol.parquet.*no column 'text'"):
        read_all([path])
    docs, stats = read_all([path], on_error="skip")
    assert docs == [] and stats.totals()["files_skipped"] == 1
    assert "no column" in stats.skipped[0]["reason"]


def test_corrupt_compressed_file(corpus):
    path = str(corpus / "corrupt.txt.gz")
    with pytest.raises(DataError, match="corrupt.txt.gz"):
        read_all([path])
    docs, stats = read_all([path, str(corpus / "corpus" / "a.txt")], on_error="skip")
    assert len(docs) == 1 and stats.totals()["files_skipped"] == 1


def test_config_keys_validated():
    cfg = load_config(None, ["data.format=jsonl", "data.on_error=skip", "tokenizer.type=unigram"])
    assert cfg.data.format == "jsonl" and cfg.tokenizer.type == "unigram"
    for bad, key in [("data.format=xml", "data.format"), ("data.on_error=ignore", "data.on_error"),
                     ("data.val_fraction=1.5", "data.val_fraction"), ("tokenizer.type=wordpiece", "tokenizer.type"),
                     ("data.sources=[]", "data.sources"), ("tokenizer.vocab_size=10", "tokenizer.vocab_size")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="text_field"):  # unknown keys list the valid ones
        load_config(None, ["data.textfield=x"])
