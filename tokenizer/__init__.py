"""Tokenizers: SentencePiece (trained here or given) and any Hugging Face `tokenizer.json`, behind one
interface (encode, encode_batch, decode, vocab_size, bos/eos/pad ids, token_bytes, sha256, save_to).

    from xlp import tokenizer
    tok = tokenizer.train(docs, vocab_size=8000)          # SentencePiece BPE, byte fallback
    tok.save("tokenizer.model")
    tok = tokenizer.load("tokenizer.model")               # local path or fsspec URL
    tok = tokenizer.load("ckpt/")                         # a folder with tokenizer.json (transformers)
    ids = tok.encode("def f():\n    return 1\n")
    assert tok.decode(ids) == "def f():\n    return 1\n"

Knows nothing about shards or Ray: the pipeline's stages call it.
"""
from __future__ import annotations

import re
from pathlib import Path

from xlp.tokenizer import hf
from xlp.tokenizer.hf import HFTokenizer, HFTokenizerError, train_bytelevel_bpe
from xlp.tokenizer.spm import (
    BOS,
    EOS,
    PAD,
    UNK,
    Tokenizer,
    TokenizerError,
    chars_per_token,
    train,
)
from xlp.tokenizer.spm import _parse as parse_sentencepiece
from xlp.tokenizer.spm import load as load_sentencepiece

__all__ = ["Tokenizer", "HFTokenizer", "train", "train_bytelevel_bpe", "load", "find_in", "source_files",
           "is_hf", "chars_per_token", "TokenizerError", "HFTokenizerError", "BOS", "EOS", "PAD", "UNK"]

SPM_FILE = "tokenizer.model"


def is_hf(path: str | Path) -> bool:
    """Whether a local `path` is a Hugging Face tokenizer: a folder holding tokenizer.json, or a JSON file
    (a SentencePiece model is protobuf, never starting with '{')."""
    p = Path(path)
    if p.is_dir():
        return (p / hf.TOKENIZER_JSON).is_file()
    if p.suffix == ".json":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False


def find_in(folder: str | Path) -> Path:
    """The tokenizer file of an export or run folder: its tokenizer.model (our SentencePiece; an hf
    export of one holds a converted tokenizer.json too), else its tokenizer.json; the .model path
    (missing) when neither is there."""
    folder = Path(folder)
    if not (folder / SPM_FILE).is_file() and (folder / hf.TOKENIZER_JSON).is_file():
        return folder / hf.TOKENIZER_JSON
    return folder / SPM_FILE


def source_files(path: str | Path) -> list[Path]:
    """The local files load(path) reads (the fingerprint hashes them)."""
    if is_hf(path):
        return hf.source_files(path)
    p = Path(path)
    return [p / SPM_FILE if p.is_dir() else p]


def load(path: str | Path):
    """A tokenizer from a SentencePiece .model, a Hugging Face tokenizer.json, or a folder holding one
    (tokenizer.json preferred, as transformers does); local, or an fsspec URL (s3://, gs://, https://)."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        where = re.sub(r"://[^/@]*@", "://***@", text.split("?")[0])  # named without credentials or query
        with fsspec.open(text, "rb") as f:
            data = f.read()
        if data.lstrip().startswith(b"{"):
            return HFTokenizer(data, where=where)
        return parse_sentencepiece(data, where)
    if text.startswith("file://"):
        text = text[len("file://"):]
    p = Path(text)
    if is_hf(p):
        return hf.load_local(p)
    if p.is_dir():
        if (p / SPM_FILE).is_file():
            return load_sentencepiece(p / SPM_FILE)
        raise FileNotFoundError(f"tokenizer folder {p} holds neither tokenizer.json nor {SPM_FILE}")
    return load_sentencepiece(p)
