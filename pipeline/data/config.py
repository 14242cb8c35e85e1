"""Config sections of the data stages: `data.*` and `tokenizer.*`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

FORMATS = ("auto", "text", "lines", "jsonl", "parquet")
ON_ERROR = ("fail", "skip")
TOKENIZER_TYPES = ("bpe", "unigram")
MiB = 1 << 20


@dataclass
class DataConfig:
    # Files, directories, globs, fsspec URLs, `hf://dataset[:split]`, or `stdlib` (the running
    # interpreter's standard library sources: the embedded default corpus).
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    seq_len: int = 256  # tokens per training row (the loader packs documents into rows)
    val_fraction: float = 0.01  # share of documents (by a hash of their text) in the val split
    # How files are read: auto picks by extension (.jsonl/.json/.ndjson -> jsonl, .parquet -> parquet,
    # else text: one document per file); `lines` makes every line of a text file a document.
    format: str = "auto"
    text_field: str = "text"  # the JSONL key / Parquet column holding the document text
    on_error: str = "fail"  # fail | skip: what a missing/unreadable file or a malformed record does
    dedup: bool = False  # drop exact duplicate documents (the first occurrence in source order stays)
    partition_bytes: int = 8 * MiB  # input bytes per Ray task (files are grouped in source order)
    shard_bytes: int = 128 * MiB  # at most this many token bytes per tar shard
    sample_tokens: int = 2048  # consecutive documents are grouped into one WebDataset sample up to this
    num_workers: int = 0  # Ray tasks running at once in the data stages; 0 = every CPU Ray has
    loader_workers: int = 0  # DataLoader worker processes per rank for the training loader

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty: give files, dirs, globs, URLs, hf://name or stdlib")
        for i, s in enumerate(self.sources):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"data.sources[{i}] is empty")
            if s.startswith("hf://") and not s[len("hf://"):].split(":")[0]:
                raise ValueError(f"data.sources[{i}] = {s!r}: expected hf://dataset[:split]")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format is {self.format!r}; valid values: {', '.join(FORMATS)}")
        if not self.text_field:
            raise ValueError("data.text_field is empty")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error is {self.on_error!r}; valid values: {', '.join(ON_ERROR)}")
        if self.partition_bytes < 1:
            raise ValueError(f"data.partition_bytes must be >= 1, got {self.partition_bytes}")
        if self.shard_bytes < 1024:
            raise ValueError(f"data.shard_bytes must be >= 1024, got {self.shard_bytes}")
        if self.sample_tokens < 1:
            raise ValueError(f"data.sample_tokens must be >= 1, got {self.sample_tokens}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = all CPUs), got {self.num_workers}")
        if self.loader_workers < 0:
            raise ValueError(f"data.loader_workers must be >= 0, got {self.loader_workers}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    path: Optional[str] = None  # an existing SentencePiece model instead of training one
    type: str = "bpe"  # bpe | unigram
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    sample_bytes: int = 8 * MiB  # about this much text, a uniform sample of documents, trains it
    heldout_bytes: int = 1 * MiB  # about this much other text measures chars per token
    seed: int = 0
    num_threads: int = 0  # SentencePiece training threads; 0 = all CPUs (does not change the model)

    def validate(self) -> None:
        if self.type not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer.type is {self.type!r}; valid values: {', '.join(TOKENIZER_TYPES)}")
        n_min = 4 + (256 if self.byte_fallback else 0)
        if self.path is None and self.vocab_size <= n_min:
            raise ValueError(
                f"tokenizer.vocab_size must exceed {n_min} (specials"
                f"{' + 256 byte pieces' if self.byte_fallback else ''}), got {self.vocab_size}"
            )
        if self.vocab_size > 1 << 32:
            raise ValueError(f"tokenizer.vocab_size too large: {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"tokenizer.character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.sample_bytes < 1:
            raise ValueError(f"tokenizer.sample_bytes must be >= 1, got {self.sample_bytes}")
        if self.heldout_bytes < 0:
            raise ValueError(f"tokenizer.heldout_bytes must be >= 0, got {self.heldout_bytes}")
        if self.num_threads < 0:
            raise ValueError(f"tokenizer.num_threads must be >= 0, got {self.num_threads}")
