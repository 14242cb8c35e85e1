"""SentencePiece training and a small, picklable Tokenizer around a trained model.

Settings chosen for source code and prose alike:
- byte fallback: any byte sequence encodes (no <unk> for unseen characters), and decode(encode(s)) == s;
- identity normalisation, no dummy prefix, extra whitespace kept, whitespace-only pieces allowed:
  indentation and newlines survive the round trip exactly;
- specials at fixed ids: <pad>=0, <unk>=1, <bos>=2, <eos>=3.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

if TYPE_CHECKING:
    import numpy as np

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")

# SentencePiece skips training "sentences" longer than max_sentence_length bytes, so documents are
# cut at line ends into pieces of about this many characters before training.
TRAIN_CHUNK_CHARS = 2048
MAX_SENTENCE_BYTES = 16384
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class TokenizerError(ValueError):
    """A tokenizer model that cannot be used; from load(), the message is one line naming the file."""


class Tokenizer:
    """A SentencePiece model with the pipeline's specials; pickles as its model bytes (for Ray)."""

    kind = "spm"
    FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        if not self._proto:
            raise TokenizerError("an empty file (0 bytes), not a SentencePiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError:  # SentencePiece's message names neither the file nor the cause
            raise TokenizerError("not a SentencePiece model (its bytes do not parse as one)") from None
        self.vocab_size: int = self._sp.get_piece_size()
        if self.vocab_size == 0:
            raise TokenizerError("a SentencePiece model with no pieces")
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._special(BOS, self._sp.bos_id())
        self.eos_id: int = self._special(EOS, self._sp.eos_id())
        pad = self._special(PAD, self._sp.pad_id())
        # A model trained elsewhere may have no pad piece; padding then uses <eos> (never a real token).
        self.pad_id: int = pad if pad >= 0 else self.eos_id
        if self.eos_id < 0:
            raise TokenizerError("the SentencePiece model has no end-of-document piece (<eos> or </s>)")

    def _special(self, piece: str, fallback: int) -> int:
        i = self._sp.piece_to_id(piece)
        if i != self.unk_id or piece == UNK:
            return i
        return fallback

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """Encode many texts; `num_threads` > 1 uses SentencePiece's own thread pool."""
        if not texts:
            return []
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    # -- the model -----------------------------------------------------------------------------

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()

    def save_to(self, folder: str | Path) -> Path:
        """Write tokenizer.model into `folder` (what tokenizer.load(folder) reads); returns its path."""
        self.save(Path(folder) / self.FILE)
        return Path(folder) / self.FILE

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for in decoded text: byte-fallback pieces `<0xNN>` one, specials
        (control and unknown pieces) none, other pieces their text with `▁` read as a space. Summed over
        a token sequence this is len(decode(ids).encode()), without decoding."""
        import numpy as np

        out = np.zeros(self.vocab_size, dtype=np.int64)
        specials = {self.pad_id, self.eos_id, self.bos_id, self.unk_id}
        sp = self._sp
        for i in range(self.vocab_size):
            if i in specials or sp.is_control(i) or sp.is_unknown(i):
                continue
            piece = sp.id_to_piece(i)
            if _BYTE_PIECE.match(piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def save(self, path: str | Path) -> None:
        """Write the .model file atomically (a temporary name renamed when whole)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self._proto)
        tmp.replace(path)

    def __getstate__(self) -> bytes:
        return self._proto

    def __setstate__(self, state: bytes) -> None:
        self.__init__(state)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def load(path: str | Path) -> Tokenizer:
    """Load a SentencePiece .model file from a local path or an fsspec URL (s3://, gs://, https://)."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        with fsspec.open(text, "rb") as f:  # named without its credentials or query
            return _parse(f.read(), re.sub(r"://[^/@]*@", "://***@", text.split("?")[0]))
    if text.startswith("file://"):
        text = text[len("file://"):]
    p = Path(text)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {p}")
    return _parse(p.read_bytes(), str(p))


def _parse(data: bytes, where: str) -> Tokenizer:
    try:
        return Tokenizer(data)
    except TokenizerError as e:
        raise TokenizerError(f"tokenizer model {where}: {e}") from None


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Documents cut at line ends into training sentences of about `chunk_chars` characters."""
    for doc in docs:
        if len(doc) <= chunk_chars:
            if doc:
                yield doc
            continue
        buf: list[str] = []
        n = 0
        for line in doc.splitlines(keepends=True):
            if len(line) > chunk_chars:  # one very long line: cut it
                if buf:
                    yield "".join(buf)
                    buf, n = [], 0
                for i in range(0, len(line), chunk_chars):
                    yield line[i:i + chunk_chars]
                continue
            buf.append(line)
            n += len(line)
            if n >= chunk_chars:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)


def train(
    docs: Iterable[str],
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    seed: int = 0,
    chunk_chars: int = TRAIN_CHUNK_CHARS,
) -> Tokenizer:
    """Train a SentencePiece model on `docs` (an iterable of strings) and return it as a Tokenizer.

    Deterministic for the same documents and settings: every sentence is used (no internal
    sub-sampling, no shuffling) and the random generator is seeded.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
    n_specials = 4 + (256 if byte_fallback else 0)
    if vocab_size <= n_specials:
        raise ValueError(f"vocab_size {vocab_size} must exceed the {n_specials} special and byte pieces")
    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(docs, chunk_chars),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            num_threads=max(1, int(num_threads)),
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise ValueError(
                f"tokenizer.vocab_size={vocab_size} is too large for the training sample: {msg.strip()} "
                "(lower tokenizer.vocab_size or raise tokenizer.sample_bytes)"
            ) from None
        raise
    return Tokenizer(_normalize_proto(out.getvalue()))


def _normalize_proto(proto: bytes) -> bytes:
    """The model with the trainer's thread count reset: the pieces do not depend on it, so neither
    should the file's bytes (shards and fingerprints key on the model's sha256)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: the bytes then record num_threads
        return proto
    m = pb.ModelProto()
    m.ParseFromString(proto)
    m.trainer_spec.num_threads = 1
    return m.SerializeToString(deterministic=True)


def model_proto(tok: Tokenizer):
    """(the parsed ModelProto, the protobuf module) of `tok`; ImportError without protobuf."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tok.model_proto)
    return m, pb


def not_plain_bpe(m, pb) -> Optional[str]:
    """What makes a parsed model other than plain BPE as xlp.tokenizer.spm.train makes it (identity
    normalisation, no dummy prefix, whitespace kept, escaped and as a prefix); None when it is.
    The faster encoders (tokenizer/fast.py, tokenizer/wordcache.py) reproduce only such models."""
    spec, norm = m.trainer_spec, m.normalizer_spec
    if spec.model_type != pb.TrainerSpec.BPE:
        return f"model type {pb.TrainerSpec.ModelType.Name(spec.model_type)} (only BPE)"
    if norm.name != "identity" or norm.precompiled_charsmap:
        return f"normalisation rule {norm.name!r} (only 'identity')"
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        return "a dummy prefix, whitespace removal or unescaped whitespace"
    if spec.treat_whitespace_as_suffix:
        return "whitespace as a suffix"
    return None


def chars_per_token(tok: Tokenizer, docs: Sequence[str], *, num_threads: int = 1) -> dict:
    """Compression on `docs`: characters, bytes and tokens in total, chars/token and bytes/token."""
    chars = sum(len(d) for d in docs)
    nbytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    tokens = sum(len(ids) for ids in tok.encode_batch(list(docs), num_threads=num_threads))
    return {
        "docs": len(docs),
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "chars_per_token": round(chars / tokens, 4) if tokens else None,
        "bytes_per_token": round(nbytes / tokens, 4) if tokens else None,
    }
