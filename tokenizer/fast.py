"""The same SentencePiece BPE model in Hugging Face `tokenizers` (Rust): a faster encoder, used only
where it gives SentencePiece's ids, and only where it is quicker.

SentencePiece's BPE encodes a text by starting from its characters and repeatedly merging the adjacent
pair whose merged piece scores highest, over the whole text (there is no split into words first).
`tokenizers`' BPE merges the adjacent pair of lowest merge rank. So the model converts to:
- the vocabulary: every piece at its id (control pieces such as <eos> keep their ids but are never
  matched in text, as in SentencePiece);
- the merges: every split of a piece into two pieces of the vocabulary, ranked by the merged piece's
  score, highest first;
- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes' <0xNN> pieces;
- the normaliser: a space becomes U+2581 (SentencePiece's whitespace escape). No pre-tokenizer.

Only models this reproduces convert: BPE, identity normalisation, no dummy prefix, whitespace kept
(the pipeline's own xlp.tokenizer.spm.train settings). For others `convert` says why not. Pieces two
splits can make rank the same in SentencePiece and differently here, so equal ids are never assumed:
`check` compares both encoders on a sample (ids and time), and the shard stage uses the fast one only if
they agree and it was the quicker. The shard stage tries it only where the word cache
(tokenizer/wordcache.py, SentencePiece itself a word at a time) cannot be used: on this project's
machines and corpus the word cache is the quicker by far, and `tokenizers` is not quicker than SentencePiece.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from xlp.tokenizer.spm import Tokenizer, model_proto, not_plain_bpe

WHITESPACE = "\u2581"


class NotConvertible(ValueError):
    """The model has a feature the conversion does not reproduce; the message says which."""


def convert(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes as `tok` does; NotConvertible naming what differs."""
    try:
        import tokenizers
        from tokenizers import models, normalizers
    except ImportError:
        raise NotConvertible("the `tokenizers` package is not installed") from None
    try:
        m, pb = model_proto(tok)
    except ImportError:
        raise NotConvertible("protobuf is not installed (needed to read the SentencePiece model)") from None
    problem = not_plain_bpe(m, pb)
    if problem is not None:
        raise NotConvertible(problem)
    normal, byte = pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.BYTE
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    if any(p.type == user_defined for p in m.pieces):
        raise NotConvertible("user-defined pieces (SentencePiece matches them before BPE)")

    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    score = {p.piece: p.score for p in m.pieces if p.type == normal}
    # merge (left, right) -> the merged piece's rank: SentencePiece merges the highest score first
    ranked = []
    for piece, s in score.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in score and right in score:
                ranked.append((-s, vocab[piece], vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = m.pieces[tok.unk_id].piece
    byte_fallback = any(p.type == byte for p in m.pieces)
    fast = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                           byte_fallback=byte_fallback, dropout=None))
    fast.normalizer = normalizers.Replace(" ", WHITESPACE)
    return fast


def set_threads(n: int) -> None:
    """Threads `tokenizers` uses for a batch in this process (its pool is made on first use, so call
    this before encoding; later calls do nothing)."""
    os.environ["RAYON_NUM_THREADS"] = str(max(1, int(n)))


class FastEncoder:
    """`encode_batch` as Tokenizer.encode_batch, through `tokenizers`' batch path without offsets."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.fast = convert(tok)

    def encode_batch(self, texts: Sequence[str], **_: object) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.fast.encode_batch_fast(list(texts), add_special_tokens=False)]


@dataclass
class Agreement:
    """The fast encoder against SentencePiece on a sample: `identical` only if every document's ids are."""

    identical: bool
    docs: int
    chars: int
    reason: str = ""  # why the fast path is not used (a failed conversion, or the first difference)
    first_difference: Optional[dict] = field(default=None)
    sentencepiece_s: float = 0.0  # each encoder's time on the sample
    fast_s: float = 0.0

    @property
    def faster(self) -> bool:
        """Identical, and quicker than SentencePiece on the sample (on short texts it is not)."""
        return self.identical and 0 < self.fast_s < self.sentencepiece_s

    def to_dict(self) -> dict:
        return {"identical": self.identical, "docs": self.docs, "chars": self.chars, "reason": self.reason,
                "first_difference": self.first_difference, "sentencepiece_s": round(self.sentencepiece_s, 4),
                "fast_s": round(self.fast_s, 4), "faster": self.faster}


def first_difference(want: Sequence, got: Sequence, name: str) -> Optional[dict]:
    """Where another encoder's ids (`got`, under `name`) first differ from SentencePiece's (`want`):
    the document, the token, and 8 ids of each from there; None when every document's ids are equal."""
    import numpy as np

    if len(want) != len(got):
        return {"doc": min(len(want), len(got)), "token": 0, "sentencepiece": [], name: []}
    for i, (a, b) in enumerate(zip(want, got)):
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if len(a) == len(b) and np.array_equal(a, b):
            continue
        n = min(len(a), len(b))
        unequal = np.nonzero(a[:n] != b[:n])[0]
        at = int(unequal[0]) if len(unequal) else n
        return {"doc": i, "token": at, "sentencepiece": a[at:at + 8].tolist(), name: b[at:at + 8].tolist()}
    return None


def check(tok: Tokenizer, texts: Sequence[str]) -> tuple[Optional[FastEncoder], Agreement]:
    """The fast encoder and its agreement with `tok` on `texts`; (None, why) when it cannot be made."""
    chars = sum(len(t) for t in texts)
    try:
        fast = FastEncoder(tok)
    except NotConvertible as e:
        return None, Agreement(False, 0, 0, reason=f"not convertible: {e}")
    fast.encode_batch(["warm up"])  # the thread pool starts on first use: not part of the timing
    t = time.perf_counter()
    want = tok.encode_batch(list(texts))
    spm_s = time.perf_counter() - t
    t = time.perf_counter()
    got = fast.encode_batch(list(texts))
    fast_s = time.perf_counter() - t
    diff = first_difference(want, got, "fast")
    if diff is not None:
        return fast, Agreement(False, len(texts), chars, reason=f"ids differ in sample document {diff['doc']}",
                               first_difference=diff, sentencepiece_s=spm_s, fast_s=fast_s)
    return fast, Agreement(True, len(texts), chars, sentencepiece_s=spm_s, fast_s=fast_s)
