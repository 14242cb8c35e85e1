"""SentencePiece tokenizers: train, load, batch-encode, decode; `<bos>`/`<eos>`/`<pad>` specials.

    from xlp import tokenizer
    tok = tokenizer.train(docs, vocab_size=8000)          # BPE, byte fallback
    tok.save("tokenizer.model")
    tok = tokenizer.load("tokenizer.model")               # local path or fsspec URL
    ids = tok.encode("def f():\n    return 1\n")
    assert tok.decode(ids) == "def f():\n    return 1\n"

Knows nothing about shards or Ray: the pipeline's stages call it.
"""
from xlp.tokenizer.spm import (
    BOS,
    EOS,
    PAD,
    UNK,
    Tokenizer,
    chars_per_token,
    load,
    train,
)

__all__ = ["Tokenizer", "train", "load", "chars_per_token", "BOS", "EOS", "PAD", "UNK"]
