"""The fast encoder (tokenizer/fast.py: the SentencePiece model in Hugging Face `tokenizers`) gives
SentencePiece's ids on real text, says so when it does not, and the shard stage uses it only where it
agrees (and is the quicker)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

import tokenizer as tk
from tokenizer.fast import FastEncoder, NotConvertible, check

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


def tied_model(path: Path) -> Path:
    """A BPE model where two merges tie: "ab" and "bc" score the same. SentencePiece then merges the
    leftmost pair ("abc" -> "ab" "c"); a ranked merge list puts one of them first for every position,
    here "bc" (its id is lower), giving "a" "bc". The check must see the difference."""
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
    path.write_bytes(m.SerializeToString())
    return path


def test_a_tie_sentencepiece_breaks_otherwise_is_found(tmp_path):
    tok = tk.load(tied_model(tmp_path / "tied.model"))
    fast, agreement = check(tok, ["ab ab", "abc"])
    assert not agreement.identical and agreement.reason == "ids differ in sample document 1"
    diff = agreement.first_difference
    assert [tok.id_to_piece(i) for i in diff["sentencepiece"]] == ["ab", "c"]
    assert [tok.id_to_piece(i) for i in diff["fast"]] == ["a", "bc"]


@pytest.mark.slow
def test_shard_stage_uses_the_fast_encoder_only_where_it_agrees(tmp_path):
    """Real `xlp run` of tokenizer and shard: with a trained BPE model every partition's check agrees
    (the fast encoder then writes the rest where it was quicker), and the shards are byte for byte those
    of data.encoder=sentencepiece; the tied model falls back to SentencePiece, with the difference in
    the stage's metrics."""
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

    fast = shard("fast")
    assert fast["encoder_check"]["identical"] and fast["encoder_check"]["docs"] > 0
    # each partition took the fast encoder exactly when it agreed on the first batch and was quicker
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "fast" / "shard" / "meta").glob("part-*.json"))]
    assert len(parts) == fast["partitions"] >= 2
    assert all(p["check"]["identical"] for p in parts)
    assert [p["encoder"] for p in parts] == ["fast" if p["check"]["faster"] else "sentencepiece" for p in parts]
    assert sum(fast["encoder_partitions"].values()) == len(parts)
    slow = shard("spm", "data.encoder=sentencepiece")
    assert slow["encoder"] == "sentencepiece" and slow["encoder_check"]["partitions"] == 0
    shards = sorted(p.name for p in (tmp_path / "fast" / "shard").glob("*.tar"))
    assert shards and all((tmp_path / "fast" / "shard" / n).read_bytes() == (tmp_path / "spm" / "shard" / n).read_bytes()
                          for n in shards)  # the same bytes whichever encoder wrote them

    tied = shard("tied", f"tokenizer.path={tied_model(tmp_path / 'tied.model')}")
    assert tied["encoder"] in ("sentencepiece", "mixed") and not tied["encoder_check"]["identical"]
    assert tied["encoder_check"]["first_difference"]["reason"].startswith("ids differ")
