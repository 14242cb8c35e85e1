"""SentencePiece's own ids, a word at a time, each distinct word encoded once per partition.

Why the ids are the same. SentencePiece's BPE starts from a text's characters and repeatedly merges the
adjacent pair whose merged piece is in the vocabulary with the highest score, over the whole text. A
merge therefore never joins two symbols whose union is not a piece. Where no piece of the vocabulary
has a whitespace mark (U+2581, what a space becomes) right after a non-whitespace character, which
SentencePiece's trainer guarantees when it splits by whitespace (its default, and ours), no merge can
ever cross the start of a run of spaces. The text then splits there into independent words: every
merge happens inside one word, in the same order relative to the other merges of that word, so each
word encoded alone gives the ids it gets inside the text, and the text's ids are their concatenation.

Why it is faster. Text repeats its words (Zipf): the stdlib corpus (31.5 MB of Python) has 0.57M
distinct space-delimited words, so most words are a dictionary lookup instead of a BPE run. One thread,
cold cache, that corpus encodes at about 2x SentencePiece's rate (`python benchmarks/bench_data.py`).

Only models where the argument holds are accepted (`reason_not_exact` says why not): BPE, identity
normalisation with escaped whitespace, no dummy prefix, no whitespace removal, whitespace as a prefix,
and the vocabulary property above. The shard stage still compares it with SentencePiece on each
partition's first batch before using it (pipeline/data/work.py), as for any encoder that is not
SentencePiece itself.
"""
from __future__ import annotations

import itertools
import re
from typing import Optional, Sequence

import numpy as np

from xlp.tokenizer.spm import Tokenizer, model_proto, not_plain_bpe

WHITESPACE = "\u2581"
# a run of spaces and the non-space characters after it, or a run of spaces at the end of a text
WORD = re.compile(r" *[^ ]+| +")


_REASONS: dict[str, Optional[str]] = {}  # model sha256 -> reason_not_exact (a scan of every piece)


def reason_not_exact(tok: Tokenizer) -> Optional[str]:
    """Why encoding word by word could differ from SentencePiece on this model (None: it cannot)."""
    if tok.sha256 not in _REASONS:
        _REASONS[tok.sha256] = _reason_not_exact(tok)
    return _REASONS[tok.sha256]


def _reason_not_exact(tok: Tokenizer) -> Optional[str]:
    try:
        m, pb = model_proto(tok)
    except ImportError:
        return "protobuf is not installed (needed to read the SentencePiece model)"
    problem = not_plain_bpe(m, pb)
    if problem is not None:
        return problem
    for p in m.pieces:
        s = p.piece
        if any(s[i] == WHITESPACE and s[i - 1] != WHITESPACE for i in range(1, len(s))):
            return f"piece {s!r} spans the start of a run of spaces"
    return None


class WordCacheEncoder:
    """`encode_batch` as Tokenizer.encode_batch (ids as int64 arrays), encoding each distinct word once.

    The cache lives as long as the encoder (the shard stage makes one per partition) and is emptied
    when it holds more than `max_chars` characters of words, so memory stays bounded on any corpus."""

    def __init__(self, tok: Tokenizer, *, max_chars: int = 64 << 20):
        reason = reason_not_exact(tok)
        if reason is not None:
            raise ValueError(f"word-by-word encoding is not exact for this model: {reason}")
        self.tok, self.max_chars = tok, max_chars
        self.words = self.misses = 0  # words seen, and those SentencePiece had to encode
        self._clear()

    def _clear(self) -> None:
        self._index: dict[str, int] = {}  # word -> its slot
        self._ids = np.empty(1 << 16, dtype=np.int32)  # every slot's ids, back to back
        self._start = np.zeros(1 << 12, dtype=np.int64)  # slot -> first position in _ids
        self._len = np.zeros(1 << 12, dtype=np.int64)
        self._used = 0  # positions of _ids in use
        self._chars = 0

    def _add(self, words: list[str]) -> None:
        encoded = self.tok.encode_batch(words, num_threads=1)
        lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        total = int(lens.sum())
        slot0 = len(self._index)
        if slot0 + len(words) > len(self._start):
            grow = max(2 * len(self._start), slot0 + len(words))
            self._start = np.resize(self._start, grow)
            self._len = np.resize(self._len, grow)
        if self._used + total > len(self._ids):
            self._ids = np.resize(self._ids, max(2 * len(self._ids), self._used + total))
        self._ids[self._used:self._used + total] = np.fromiter(
            itertools.chain.from_iterable(encoded), dtype=np.int32, count=total)
        self._len[slot0:slot0 + len(words)] = lens
        self._start[slot0:slot0 + len(words)] = self._used + np.cumsum(lens) - lens
        self._used += total
        self._index.update(zip(words, range(slot0, slot0 + len(words))))
        self._chars += sum(map(len, words))

    def encode_batch(self, texts: Sequence[str], **_: object) -> list[np.ndarray]:
        if not texts:
            return []
        if self._chars > self.max_chars:
            self._clear()
        per_text = [WORD.findall(t) for t in texts]
        words = list(itertools.chain.from_iterable(per_text))
        index = self._index
        new = [w for w in set(words) if w not in index]  # (slot order varies between runs; ids do not)
        if new:
            self._add(new)
        self.words += len(words)
        self.misses += len(new)
        slots = np.array(list(map(index.__getitem__, words)), dtype=np.int64)
        lens = self._len[slots]
        ends = np.cumsum(lens)
        # the ids of every word in order: each word's slot run, laid end to end
        positions = np.repeat(self._start[slots] - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)
        ids = self._ids[positions].astype(np.int64)
        word_ends = np.cumsum([len(w) for w in per_text])
        cuts = np.concatenate([[0], ends])[word_ends]
        return np.split(ids, cuts[:-1])

    def stats(self) -> dict:
        return {"words": self.words, "distinct_words_encoded": self.misses,
                "hit_rate": round(1 - self.misses / self.words, 4) if self.words else None}
