"""`data.*`: what the corpus is, how the data stages read and shard it (`tokenizer.*` is in
pipeline/stages/tokenizer.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("auto", "text", "lines", "jsonl", "parquet")
ON_ERROR = ("fail", "skip")
MiB = 1 << 20
# A document longer than this is cut near it (at a newline or space) into pieces, each a document
# (counted as docs_split / split_pieces): above natural documents (a long book is 1-2 MB), and what
# bounds a data worker's memory: encoding a piece peaks at ~60x its size (SentencePiece's state per
# character plus Python ints), ~300 MiB here (python -m pipeline.bench_bigdoc).
MAX_DOC_BYTES = 4 * MiB


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
    max_doc_bytes: int = MAX_DOC_BYTES  # longer documents are split near this (see MAX_DOC_BYTES)
    num_workers: int = 0  # Ray tasks running at once in the data stages; 0 = every CPU Ray has

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
        if not 4096 <= self.max_doc_bytes <= 1 << 31:
            raise ValueError(f"data.max_doc_bytes must be in [4096, 2**31], got {self.max_doc_bytes}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = all CPUs), got {self.num_workers}")
