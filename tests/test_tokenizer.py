"""The tokenizer library: real SentencePiece trained on real text (stdlib sources)."""
from __future__ import annotations

import pickle
import sysconfig
from pathlib import Path

import pytest

from xlp import tokenizer as tk

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def corpus(max_bytes: int = 300_000) -> list[str]:
    docs, n = [], 0
    for sub in ("json", "http", "logging", "email"):
        for p in sorted((STDLIB / sub).glob("*.py")):
            text = p.read_text(encoding="utf-8")
            docs.append(text)
            n += len(text)
            if n >= max_bytes:
                return docs
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def tok(docs) -> tk.Tokenizer:
    return tk.train(docs, vocab_size=1000, num_threads=1)


def test_specials_and_roundtrip(tok, docs):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.id_to_piece(tok.bos_id) == "<bos>" and tok.id_to_piece(tok.eos_id) == "<eos>"
    assert tok.id_to_piece(tok.pad_id) == "<pad>"
    assert tok.vocab_size == 1000 == len(tok)
    for text in docs[:5] + ["  indented\n\tand tabs\r\n", "émoji ✓ 😀 中文", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("def f():\n    return 1\n", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "def f():\n    return 1\n"  # specials decode to nothing


def test_byte_fallback_never_unk(tok):
    ids = tok.encode("\u16a0\u16a1 \U0001f9ec")  # runes + DNA emoji: not in the training text
    assert tok.unk_id not in ids
    assert tok.decode(ids) == "\u16a0\u16a1 \U0001f9ec"


def test_encode_batch_matches_encode(tok, docs):
    batch = tok.encode_batch(docs[:8], num_threads=2)
    assert batch == [tok.encode(d) for d in docs[:8]]
    assert tok.encode_batch(docs[:3], add_eos=True) == [tok.encode(d) + [tok.eos_id] for d in docs[:3]]
    assert tok.encode_batch([]) == []


def test_save_load_pickle(tok, tmp_path, docs):
    path = tmp_path / "sub" / "t.model"
    tok.save(path)
    for loaded in (tk.load(path), tk.load(f"file://{path}"), pickle.loads(pickle.dumps(tok))):
        assert loaded.sha256 == tok.sha256
        assert loaded.encode(docs[0]) == tok.encode(docs[0])
    with pytest.raises(FileNotFoundError):
        tk.load(tmp_path / "missing.model")


def test_training_is_deterministic(docs, tok):
    again = tk.train(docs, vocab_size=1000, num_threads=2)
    assert again.model_proto == tok.model_proto


def test_unigram_and_compression(docs, tok):
    uni = tk.train(docs[:10], vocab_size=800, model_type="unigram")
    assert uni.decode(uni.encode(docs[0])) == docs[0]
    stats = tk.chars_per_token(tok, docs[-3:])
    assert stats["docs"] == 3 and stats["tokens"] == sum(len(tok.encode(d)) for d in docs[-3:])
    assert 2.0 < stats["chars_per_token"] < 8.0  # python source with a 1k vocab


def test_bad_settings(docs):
    with pytest.raises(ValueError, match="model_type"):
        tk.train(docs[:2], vocab_size=1000, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):
        tk.train(docs[:2], vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        tk.train(["tiny text only"], vocab_size=5000)
