"""The shard stage's faster encoders give SentencePiece's ids on real text, say so when they do not,
and the shard stage uses one only where it agrees: the word cache (tokenizer/wordcache.py: each distinct
word encoded once) and the `tokenizers` encoder (tokenizer/fast.py: the model in Hugging Face
`tokenizers`)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from xlp import tokenizer as tk
from xlp.pipeline.data.work import PartitionEncoder
from xlp.tokenizer.fast import FastEncoder, NotConvertible, check, first_difference
from xlp.tokenizer.wordcache import WordCacheEncoder, reason_not_exact

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# byte fallback: none of these scripts is in a vocabulary trained on Python sources
NON_ENGLISH = [
    "Grüße aus Köln: Bäcker, Straße, Übermut — und naïve Cafés.",
    "東京は日本の首都です。大阪と京都も有名な都市です。",
    "Москва — столица России; Санкт-Петербург на Неве.",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "Emoji 🙂🚀 and symbols ∑∫√ mixed with ASCII\ttabs\r\nand  double  spaces.",
    "", " ", "\n\n\n", "<eos> <bos> <pad> <unk> are text here, not specials",
]


def stdlib_docs(*packages: str) -> list[str]:
    return [p.read_text(errors="replace") for pkg in packages for p in sorted((STDLIB / pkg).glob("*.py"))]


@pytest.fixture(scope="module")
def bpe() -> tk.Tokenizer:
    return tk.train(stdlib_docs("json", "email"), vocab_size=1200)


def test_fast_ids_equal_sentencepiece_on_real_text(bpe):
    held_out = stdlib_docs("asyncio", "logging")  # text the model was not trained on
    fast, agreement = check(bpe, held_out + NON_ENGLISH)
    assert agreement.identical, agreement
    assert agreement.docs == len(held_out) + len(NON_ENGLISH) and agreement.chars > 500_000
    # byte fallback happened: the non-English sample needs <0xNN> pieces
    ids = fast.encode_batch(NON_ENGLISH[:3])
    assert any(bpe.id_to_piece(i).startswith("<0x") for doc in ids for i in doc)
    assert [bpe.decode(d) for d in ids] == NON_ENGLISH[:3]


def test_unigram_models_do_not_convert():
    unigram = tk.train(stdlib_docs("json"), vocab_size=600, model_type="unigram")
    with pytest.raises(NotConvertible, match="UNIGRAM"):
        FastEncoder(unigram)
    fast, agreement = check(unigram, ["x = 1"])
    assert fast is None and not agreement.identical and "not convertible" in agreement.reason


def tied_model(path: Path, *, span_space: bool = False) -> Path:
    """A BPE model where two merges tie: "ab" and "bc" score the same. SentencePiece then merges the
    leftmost pair ("abc" -> "ab" "c"); a ranked merge list puts one of them first for every position,
    here "bc" (its id is lower), giving "a" "bc". The check must see the difference. `span_space` adds
    the piece "c▁" (a space after a letter), so the text no longer splits into words exactly."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    base = pb.ModelProto()
    base.ParseFromString(tk.train(stdlib_docs("json"), vocab_size=400).model_proto)
    m = pb.ModelProto()
    m.CopyFrom(base)
    del m.pieces[:]
    piece = pb.ModelProto.SentencePiece
    for p in base.pieces:  # the specials and byte pieces of a real model
        if p.type != piece.NORMAL:
            m.pieces.add(piece=p.piece, score=p.score, type=p.type)
    for text, score in (("bc", -1.0), ("ab", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("\u2581", -5.0)):
        m.pieces.add(piece=text, score=score, type=piece.NORMAL)
    if span_space:
        m.pieces.add(piece="c\u2581", score=-0.5, type=piece.NORMAL)
    path.write_bytes(m.SerializeToString())
    return path


def test_a_tie_sentencepiece_breaks_otherwise_is_found(tmp_path):
    tok = tk.load(tied_model(tmp_path / "tied.model"))
    fast, agreement = check(tok, ["ab ab", "abc"])
    assert not agreement.identical and agreement.reason == "ids differ in sample document 1"
    diff = agreement.first_difference
    assert [tok.id_to_piece(i) for i in diff["sentencepiece"]] == ["ab", "c"]
    assert [tok.id_to_piece(i) for i in diff["fast"]] == ["a", "bc"]


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def test_word_cache_ids_equal_sentencepiece_on_real_text(bpe):
    assert reason_not_exact(bpe) is None  # the pipeline's trainer settings split into words exactly
    texts = stdlib_docs("asyncio", "logging") + NON_ENGLISH + ["a  b   c ", "   ", "x" * 5000 + " y"]
    want = bpe.encode_batch(texts)
    encoder = WordCacheEncoder(bpe)
    for cold in (True, False):  # then every word is cached: SentencePiece encodes nothing more
        got = [ids for batch in batches(texts, 7) for ids in encoder.encode_batch(batch)]
        assert first_difference(want, got, "wordcache") is None
        assert all(g.dtype.kind == "i" for g in got)
        if cold:
            stats = encoder.stats()
            assert stats["words"] > 50_000 and 0.5 < stats["hit_rate"] < 1  # most words came from the cache
    assert encoder.stats()["distinct_words_encoded"] == stats["distinct_words_encoded"]
    assert any(bpe.id_to_piece(int(i)).startswith("<0x") for ids in got[-12:] for i in ids)  # byte fallback ran
    assert encoder.encode_batch([]) == [] and [len(x) for x in encoder.encode_batch(["", ""])] == [0, 0]


def test_word_cache_breaks_a_tie_as_sentencepiece_does(tmp_path):
    tok = tk.load(tied_model(tmp_path / "tied.model"))
    texts = ["ab ab", "abc", "abc  abcabc bc"]
    assert first_difference(tok.encode_batch(texts), WordCacheEncoder(tok).encode_batch(texts), "wordcache") is None


def test_word_cache_refuses_models_it_cannot_split_exactly(tmp_path):
    spanning = tk.load(tied_model(tmp_path / "span.model", span_space=True))
    assert reason_not_exact(spanning) == "piece 'c\u2581' spans the start of a run of spaces"
    with pytest.raises(ValueError, match="not exact for this model: piece 'c"):
        WordCacheEncoder(spanning)
    unigram = tk.train(stdlib_docs("json"), vocab_size=600, model_type="unigram")
    assert "UNIGRAM" in reason_not_exact(unigram)


def test_partition_encoder_picks_the_word_cache_and_falls_back_on_text_without_repeats(bpe):
    texts = stdlib_docs("asyncio")
    want = bpe.encode_batch(texts)
    enc = PartitionEncoder(bpe, "auto", threads=1)
    got = enc.encode_batch(texts[:10])  # the check: SentencePiece's ids are the ones returned
    assert enc.name == "wordcache" and enc.checked["candidates"]["wordcache"]["identical"]
    assert "fast" not in enc.checked["candidates"]  # `tokenizers` is tried only without an exact word cache
    for batch in batches(texts[10:], 5):
        got += enc.encode_batch(batch)
    assert first_difference(want, got, "auto") is None
    rec = enc.record()
    assert rec["encoder"] == "wordcache" and rec["wordcache"]["fell_back"] is None and rec["wordcache"]["hit_rate"] > 0.5

    import random

    rng = random.Random(0)  # words that never repeat: the cache only adds work
    unique = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12)) for _ in range(400))
              for _ in range(12)]
    enc = PartitionEncoder(bpe, "auto", threads=1)
    got = [ids for batch in batches(unique, 2) for ids in enc.encode_batch(batch)]
    assert first_difference(bpe.encode_batch(unique), got, "auto") is None
    rec = enc.record()
    assert rec["encoder"] == "sentencepiece" and rec["wordcache"]["fell_back"].startswith(
        f"0% of the words of batches 2-{PartitionEncoder.WARMUP_BATCHES + 1} came from the cache")


def test_partition_encoder_uses_sentencepiece_where_neither_candidate_agrees(tmp_path):
    tok = tk.load(tied_model(tmp_path / "span.model", span_space=True))
    enc = PartitionEncoder(tok, "auto", threads=1)
    texts = ["ab ab", "abc", "abc  abcabc bc"]
    for _ in range(2):  # the check's batch, then a later one: SentencePiece's ids both times
        assert first_difference(tok.encode_batch(texts), enc.encode_batch(texts), "auto") is None
    rec = enc.record()
    assert rec["encoder"] == "sentencepiece" and "wordcache" not in rec
    trials = rec["check"]["candidates"]
    assert trials["wordcache"]["reason"].startswith("not exact: piece 'c")
    assert not trials["fast"]["identical"] and trials["fast"]["reason"] == "ids differ in sample document 1"


@pytest.mark.slow
def test_shard_stage_uses_a_faster_encoder_only_where_it_agrees(tmp_path):
    """Real `xlp run` of tokenizer and shard: with a trained BPE model every partition's check agrees
    and the word cache encodes the rest; the shards are byte for byte those of data.encoder=sentencepiece.
    A model that neither the word cache (a piece spans a space) nor `tokenizers` (a tie) reproduces falls
    back to SentencePiece, with the reasons and the first difference in the stage's metrics."""
    import subprocess

    from conftest import XLP, xlp_env

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_docs("json") + NON_ENGLISH[:5]):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    (corpus / "tied.txt").write_text("abc ab bc abcabc\n" * 50)

    def shard(run: str, *overrides: str) -> dict:
        r = subprocess.run([*XLP, "run", str(Path(__file__).parent.parent / "configs" / "tiny.yaml"), "--stages",
                            "tokenizer,shard", "--run-dir", str(tmp_path / run), f"data.sources=[{corpus}]",
                            "data.partition_bytes=20000", *overrides],
                           env=xlp_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads((tmp_path / run / "shard" / "stage.json").read_text())["metrics"]

    auto = shard("auto")
    check = auto["encoder_check"]
    assert check["docs"] > 0 and check["candidates"]["wordcache"]["identical"]
    assert check["candidates"]["wordcache"]["partitions"] == check["partitions"] == auto["partitions"] >= 2
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "auto" / "shard" / "meta").glob("part-*.json"))]
    assert len(parts) == auto["partitions"] and all(p["check"]["candidates"]["wordcache"]["identical"] for p in parts)
    # a partition's encoder is the word cache unless it fell back (then the record says why)
    assert all(p["encoder"] == ("sentencepiece" if p["wordcache"]["fell_back"] else "wordcache") for p in parts)
    assert auto["wordcache"]["words"] > 0 and auto["task_seconds"] >= auto["encode_seconds"] > 0
    spm = shard("spm", "data.encoder=sentencepiece")
    assert spm["encoder"] == "sentencepiece" and spm["encoder_check"]["partitions"] == 0
    shards = sorted(p.name for p in (tmp_path / "auto" / "shard").glob("*.tar"))
    assert shards and all((tmp_path / "auto" / "shard" / n).read_bytes() == (tmp_path / "spm" / "shard" / n).read_bytes()
                          for n in shards)  # the same bytes whichever encoder wrote them

    model = tied_model(tmp_path / "span.model", span_space=True)
    neither = shard("neither", f"tokenizer.path={model}")
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "neither" / "shard" / "meta").glob("part-*.json"))]
    # `tokenizers` encodes a partition exactly where it agreed on the first batch and was the quicker
    assert [p["encoder"] for p in parts] == [
        "fast" if p["check"]["candidates"]["fast"]["faster"] else "sentencepiece" for p in parts]
    assert "wordcache" not in neither["encoder_partitions"]
    trials = neither["encoder_check"]["candidates"]
    assert not trials["wordcache"]["identical"] and trials["wordcache"]["reason"].startswith("not exact: piece 'c")
    assert not trials["fast"]["identical"]  # the tie: in the partition holding tied.txt
    diff = neither["encoder_check"]["first_difference"]
    assert diff["encoder"] == "fast" and diff["reason"].startswith("ids differ")
