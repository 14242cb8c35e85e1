"""Bounded memory and nothing uncounted (issue 17, items 3, 4, 6): long documents split near
data.max_doc_bytes and counted, symlinked directories followed (loops named), hidden names counted,
every format's non-text values failing or counted, and every bad input failing on one line naming
the file. Real files, real SentencePiece, real Ray where the stages run."""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xlp.pipeline.core.config import ConfigError, load_config
from xlp.pipeline.data.readers import (
    DataError,
    FileRef,
    ReadStats,
    bounded_pieces,
    cut_point,
    hf_values,
    iter_documents,
    resolve_sources,
)

KiB = 1 << 10
LIMIT = 64 * KiB
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jolly vexing sphinx "


def read_all(sources, *, fmt="auto", on_error="fail", limit=LIMIT, text_field="text"):
    stats = ReadStats()
    files = resolve_sources(sources, fmt=fmt, on_error=on_error, stats=stats)
    docs = [d for f in files for d in iter_documents(f, text_field=text_field, on_error=on_error, stats=stats,
                                                     max_doc_bytes=limit)]
    return docs, stats


def one_mib_line() -> str:
    text = (WORDS * (2 * (1 << 20) // len(WORDS)))[: 1 << 20]
    assert "\n" not in text and len(text.encode()) == 1 << 20
    return text


# ---------------------------------------------------------------------------------------------
# Splitting


def test_cut_point_prefers_newline_then_space_then_char_boundary():
    limit = 100
    assert cut_point(b"a" * 80 + b"\n" + b"b " * 30, limit) == 81  # after the newline
    assert cut_point(b"a" * 90 + b" " + b"b" * 30, limit) == 91  # no newline near: after the space
    assert cut_point(b"a" * 10 + b"\n" + b"b" * 200, limit) == 100  # newline too far back: hard cut
    euro = "€".encode() * 60  # 3-byte characters, none starting at byte 100
    p = cut_point(euro, limit)
    assert p == 99 and euro[:p].decode() == "€" * 33


def test_bounded_pieces_hold_the_document_exactly():
    data = b"word " * 10_000 + b"end"
    pieces = list(bounded_pieces(io.BytesIO(data).read, 4096))
    assert b"".join(p for p, _ in pieces) == data
    assert all(len(p) <= 4096 for p, _ in pieces) and [last for _, last in pieces][-1]
    assert all(p.endswith(b" ") for p, _ in pieces[:-1])  # cut at whitespace, never inside a word
    assert list(bounded_pieces(io.BytesIO(b"").read, 4096)) == [(b"", True)]  # an empty document is one


@pytest.mark.parametrize("fmt", ["text", "lines"])
def test_one_mib_line_split_into_counted_pieces(tmp_path, fmt):
    line = one_mib_line()
    p = tmp_path / "big.txt"
    p.write_text("short line before\n" + line + "\nshort line after\n" if fmt == "lines" else line)
    docs, stats = read_all([str(p)], fmt=fmt)
    t = stats.totals()
    big = [d for d in docs if "short line" not in d]
    assert "".join(big) == line  # nothing lost, nothing added
    assert all(len(d.encode()) <= LIMIT for d in docs)
    assert all(len(d.encode()) > LIMIT * 3 // 4 for d in big[:-1])  # cut near the limit
    assert all(d.endswith(" ") for d in big[:-1])
    assert len(big) == 17  # 1 MiB in pieces of at most 64 KiB, cut a little before the limit each time
    assert t["docs_split"] == 1 and t["split_pieces"] == 17
    assert t["docs_read"] == 17 + (2 if fmt == "lines" else 0)
    assert t["bytes"] == p.stat().st_size


def test_split_without_whitespace_at_character_boundaries(tmp_path):
    p = tmp_path / "dump.txt.gz"
    text = "é€𝄞" * 40_000  # no whitespace, 2/3/4-byte characters: 360 KB
    p.write_bytes(gzip.compress(text.encode()))
    docs, stats = read_all([str(p)])
    assert "".join(docs) == text and stats.totals()["replacement_chars"] == 0
    assert stats.totals()["docs_split"] == 1 and len(docs) == stats.totals()["split_pieces"] == 6


def test_jsonl_record_over_the_limit_is_a_bad_record(tmp_path):
    p = tmp_path / "recs.jsonl"
    p.write_text(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": one_mib_line()}) + "\n"
                 + json.dumps({"text": "after"}) + "\n")
    with pytest.raises(DataError) as e:
        read_all([str(p)])
    msg = str(e.value)
    assert "\n" not in msg and f"{p}:2:" in msg and "longer than data.max_doc_bytes=65536" in msg
    docs, stats = read_all([str(p)], on_error="skip")
    assert docs == ["small", "after"]  # the reader went past the long line in bounded pieces
    assert stats.totals()["bad_records"] == 1 and stats.bad_records[0]["line"] == 2
    assert stats.totals()["bytes"] == p.stat().st_size


def test_parquet_value_over_the_limit_is_split(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["small", one_mib_line()]}), p)
    docs, stats = read_all([str(p)])
    assert docs[0] == "small" and "".join(docs[1:]) == one_mib_line()
    assert stats.totals()["docs_split"] == 1 and stats.totals()["split_pieces"] == len(docs) - 1 == 17


def test_max_doc_bytes_validated_and_in_the_fingerprints():
    from xlp.pipeline.core.registry import SHARD, TOKENIZER

    assert load_config(None, ["data.max_doc_bytes=65536"]).data.max_doc_bytes == 65536
    for bad in ("data.max_doc_bytes=100", "data.max_doc_bytes=0"):
        with pytest.raises(ConfigError, match=r"data\.max_doc_bytes"):
            load_config(None, [bad])
    assert "data.max_doc_bytes" in SHARD.reads and "data.max_doc_bytes" in TOKENIZER.reads


# ---------------------------------------------------------------------------------------------
# Directories: symlinks and hidden names


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("one")
    (root / "a" / ".secret.txt").write_text("hidden file")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden dir")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"\x00")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "two.txt").write_text("two")
    os.symlink(outside, root / "linked")  # a symlinked directory: followed
    os.symlink(root, root / "a" / "up")  # a loop back to an ancestor
    os.symlink(outside, root / "z_again")  # a second link to a directory already walked
    return root


def test_symlinked_dirs_followed_loops_named_hidden_counted(tree):
    docs, stats = read_all([str(tree)])
    assert docs == ["one", "two"]
    t = stats.totals()
    assert t["files"] == 2 and t["hidden_skipped"] == 3 and t["symlink_loops"] == 2
    reasons = {Path(u["path"]).name: u["reason"] for u in stats.unread}
    assert set(reasons) == {".secret.txt", ".git", "__pycache__", "up", "z_again"}
    assert "symlink loop" in reasons["up"] and str(tree) in reasons["up"]
    assert "second link" in reasons["z_again"] and str(tree / "linked") in reasons["z_again"]


def test_unread_names_in_shard_manifest_and_counts(tree, tmp_path, ray_local):
    run = tmp_path / "run"
    (tree / "big.txt").write_text(one_mib_line())
    ov = [f"data.sources=[{tree}]", "tokenizer.vocab_size=300", "data.max_doc_bytes=65536",
          "data.val_fraction=0.0"]
    tm = run_stage("tokenizer", run, ov)
    sm = run_stage("shard", run, ov)
    for m in (tm, sm):
        assert (m["docs_split"], m["split_pieces"], m["hidden_skipped"], m["symlink_loops"]) == (1, 17, 3, 2)
        assert len(m["not_read_list"]) == 5
    assert sm["docs_kept"] == sm["train_docs"] == 17 + 2
    manifest = json.loads((run / "shard" / "manifest.json").read_text())
    assert manifest["counts"]["docs_split"] == 1 and manifest["counts"]["hidden_skipped"] == 3
    assert manifest["config"]["max_doc_bytes"] == 65536
    assert {Path(u["path"]).name for u in manifest["listed"]["not_read_list"]} == {
        ".secret.txt", ".git", "__pycache__", "up", "z_again"}
    from xlp import tokenizer as tk

    tok = tk.load(run / "tokenizer" / "tokenizer.model")
    docs, _ = read_all([str(tree)])
    assert manifest["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)  # the pieces were encoded


def run_stage(name: str, run_dir: Path, overrides: list[str]) -> dict:
    from xlp.pipeline.core.stage import StageContext
    from xlp.pipeline.stages import shard as shard_stage
    from xlp.pipeline.stages import tokenizer as tok_stage

    cfg = load_config(None, overrides)
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=name, cfg=cfg, run_dir=run_dir, fingerprint="test")
    return {"tokenizer": tok_stage.run, "shard": shard_stage.run}[name](ctx)


# ---------------------------------------------------------------------------------------------
# Non-text values, in every format


def test_parquet_non_string_fails_naming_row_column_type_or_is_counted(tmp_path):
    p = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"text": pa.array([{"a": 1}, {"a": 2}, None])}), p)
    with pytest.raises(DataError) as e:
        read_all([str(p)])
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "row 0, column 'text'" in msg and "holds a dict" in msg
    docs, stats = read_all([str(p)], on_error="skip")
    assert docs == [] and stats.totals()["bad_records"] == 2 and stats.totals()["docs_empty"] == 1
    assert stats.bad_records[1]["reason"].startswith("row 1, column 'text': field 'text' holds a dict")


def test_jsonl_non_string_value(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"text": "ok"}\n{"text": [1, 2]}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*holds a list"):
        read_all([str(p)])
    assert read_all([str(p)], on_error="skip")[0] == ["ok"]


def test_hf_values_checked_like_every_format():
    datasets = pytest.importorskip("datasets")
    ref = FileRef(source="hf://local", url="local", size=1, fmt="hf", hf_split="train")
    ds = datasets.Dataset.from_dict({"text": [1, 2, 3]})
    with pytest.raises(DataError) as e:
        list(hf_values(ds, ref, "text", "fail", ReadStats()))
    assert "\n" not in str(e.value) and "row 0, column 'text'" in str(e.value) and "holds a int" in str(e.value)
    stats = ReadStats()
    assert list(hf_values(ds, ref, "text", "skip", stats)) == [] and stats.totals()["bad_records"] == 3
    ds = datasets.Dataset.from_dict({"text": ["fine", None, "x " * 40_000]})
    stats = ReadStats()
    out = list(hf_values(ds, ref, "text", "fail", stats, limit=32 * KiB))
    assert out[:2] == ["fine", ""] and "".join(out[2:]) == "x " * 40_000 and stats.totals()["docs_split"] == 1


# ---------------------------------------------------------------------------------------------
# Every bad input: one line naming the file and the cause


def bad_inputs(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(source, fmt, what the message must say) for each kind of bad input."""
    d = tmp_path
    (d / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not gzip at all")
    (d / "trunc.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd\x00\x58garbage")
    (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": nope\n')
    (d / "notobj.jsonl").write_text('[1, 2]\n')
    (d / "nofield.jsonl").write_text('{"body": "x"}\n')
    (d / "long.jsonl").write_text(json.dumps({"text": "w " * 40_000}) + "\n")
    pq.write_table(pa.table({"body": ["x"]}), d / "nocol.parquet")
    pq.write_table(pa.table({"text": [1.5]}), d / "float.parquet")
    (d / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "withbroken").mkdir()
    os.symlink(d / "gone.txt", d / "withbroken" / "dangling.txt")
    return [
        (str(d / "missing.txt"), "auto", "no such file"),
        (str(d / "corrupt.txt.gz"), "auto", "corrupt.txt.gz"),
        (str(d / "trunc.jsonl.zst"), "auto", "trunc.jsonl.zst"),
        (str(d / "bad.jsonl"), "auto", "bad.jsonl:2: malformed JSONL record"),
        (str(d / "notobj.jsonl"), "auto", "notobj.jsonl:1: malformed JSONL record: a JSON list"),
        (str(d / "nofield.jsonl"), "auto", "nofield.jsonl:1: malformed JSONL record: no field 'text'"),
        (str(d / "long.jsonl"), "auto", "long.jsonl:1: JSONL record of 80013 bytes is longer"),
        (str(d / "nocol.parquet"), "auto", "nocol.parquet"),
        (str(d / "float.parquet"), "auto", "float.parquet: row 0, column 'text': field 'text' holds a float"),
        (str(d / "fake.parquet"), "auto", "fake.parquet"),
        (str(d / "withbroken"), "auto", "dangling.txt"),
        (str(d / "*.nothing"), "auto", "matches no files"),
    ]


def test_every_bad_input_fails_on_one_line_naming_the_file(tmp_path):
    for source, fmt, says in bad_inputs(tmp_path):
        with pytest.raises(DataError) as e:
            read_all([source], fmt=fmt)
        msg = str(e.value)
        assert "\n" not in msg and "Traceback" not in msg, (source, msg)
        assert says in msg, (source, msg)
        # and under skip: nothing raised, the file or record counted and listed
        _, stats = read_all([source], fmt=fmt, on_error="skip")
        t = stats.totals()
        assert t["files_skipped"] + t["bad_records"] >= 1, source
        listed = stats.skipped + stats.bad_records
        assert listed and all("\n" not in x["reason"] for x in listed)


def test_bad_input_fails_the_stage_on_one_line_and_marks_it_failed(tmp_path, ray_local):
    from xlp.pipeline.runner import PipelineError, run_pipeline, stage_states
    from xlp.pipeline.core.registry import STAGES

    bad = tmp_path / "float.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5]}), bad)
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"data.sources=[{bad}]", "tokenizer.vocab_size=300"])
    with pytest.raises(PipelineError) as e:
        run_pipeline(cfg, only=["tokenizer"], out=io.StringIO())
    first, *rest = str(e.value).splitlines()
    assert first.startswith("stage 'tokenizer' failed: DataError: ") and "Traceback" not in str(e.value)
    assert f"{bad}: row 0, column 'text': field 'text' holds a float" in first
    assert all(line.strip().startswith("full log:") for line in rest)
    states = {s.name: s.status for s in stage_states(STAGES, cfg, tmp_path / "run")}
    assert states["tokenizer"] == "failed"  # not left "running"
