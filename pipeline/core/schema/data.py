"""`data.*`: what the corpus is, how the data stages read and shard it (`tokenizer.*` is in
pipeline/stages/tokenizer.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMATS = ("auto", "text", "lines", "jsonl", "parquet")
ON_ERROR = ("fail", "skip")
MiB = 1 << 20
# A document longer than this is cut near it (at a newline or space) into pieces, each a document
# (counted as docs_split / split_pieces): above natural documents (a long book is 1-2 MB), and what
# bounds a data worker's memory: encoding a piece peaks at ~60x its size (SentencePiece's state per
# character plus Python ints), ~300 MiB here (python benchmarks/bench_bigdoc.py).
MAX_DOC_BYTES = 4 * MiB


ENCODERS = ("auto", "sentencepiece")


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
    # the shard stage's encoder; the ids are SentencePiece's either way. auto = in each partition, the
    # first encoder that gives SentencePiece's ids on the partition's first batch: the word cache
    # (tokenizer/wordcache.py, each distinct word encoded once; while it stays the quicker), else
    # Hugging Face `tokenizers` (tokenizer/fast.py; if it was the quicker), else SentencePiece.
    # sentencepiece = SentencePiece only
    encoder: str = "auto"
    # Named groups of sources drawn by weight in training, e.g. {web: {sources: [...], weight: 0.7},
    # code: {sources: [...], weight: 0.3}} (weights are normalised; 1 when left out). The shard stage
    # writes each group's shards apart; empty: one group, data.sources.
    # With a mixture, data.sources is not read (`xlp run` says so when it is not []): `sources: []` clears
    # one a base config set.
    mixture: dict[str, Any] = field(default_factory=dict)
    # Later weights: [{step: 900, weights: {web: 0.5, code: 0.5}}, ...]: from that step on (an annealing
    # phase); a group left out gets weight 0. Changing a phase the run has not reached continues it.
    mixture_phases: list[Any] = field(default_factory=list)
    # The global row order interleaves this many streams of each group's shards (xlp.pipeline.data.order):
    # a step's rows come from that many shards at once. Part of the order (changing it is another run).
    # Memory: a rank (or loader worker) process holds the current shard of each stream it reads (each up
    # to data.shard_bytes): streams/ranks of them with one group and ranks dividing streams (then the
    # ranks read disjoint shards), up to streams per group with a mixture.
    streams: int = 8

    def source_groups(self) -> list[tuple[str, list[str]]]:
        """(group, sources) in config order: the data.mixture groups, or ("", data.sources)."""
        if self.mixture:
            return [(name, list(group["sources"])) for name, group in self.mixture.items()]
        return [("", list(self.sources))]

    def all_sources(self) -> list[str]:
        """Every source the corpus reads (each once), for the tokenizer's sample."""
        out: list[str] = []
        for _, sources in self.source_groups():
            out.extend(s for s in sources if s not in out)
        return out

    def validate(self) -> None:
        # with a mixture data.sources is not read, and [] is how a mixture config clears an inherited one
        if not self.sources and not self.mixture:
            raise ValueError("data.sources is empty: give files, dirs, globs, URLs, hf://name or stdlib "
                             "(e.g. 'data.sources=[/data/*.jsonl]'), or data.mixture groups")
        for i, s in enumerate(self.sources):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"data.sources[{i}] is empty")
            if s.startswith("hf://") and not s[len("hf://"):].split(":")[0]:
                raise ValueError(f"data.sources[{i}] = {s!r}: expected hf://dataset[:split]")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"data.encoder is {self.encoder!r}; valid values: {', '.join(ENCODERS)}")
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
        if self.streams < 1:
            raise ValueError(f"data.streams must be >= 1, got {self.streams}")
        validate_mixture(self.mixture, self.mixture_phases)


EXAMPLE_MIXTURE = "data.mixture={web: {sources: [web/*.jsonl], weight: 0.7}, code: {sources: [code/], weight: 0.3}}"


def validate_mixture(mixture: dict, phases: list) -> None:
    """data.mixture: {name: {sources: [non-empty strings], weight: > 0}}; data.mixture_phases:
    [{step: >= 1, increasing, weights: {group: >= 0, one > 0}}], only with a mixture."""
    if not isinstance(mixture, dict):
        raise ValueError(f"data.mixture must be a mapping of groups, e.g. {EXAMPLE_MIXTURE}")
    for name, group in mixture.items():
        where = f"data.mixture.{name}"
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"data.mixture group name {name!r}: use letters, digits, '-' and '_'")
        if not isinstance(group, dict) or set(group) - {"sources", "weight"} or "sources" not in group:
            have = sorted(group) if isinstance(group, dict) else type(group).__name__
            raise ValueError(f"{where} is {have}; a group is {{sources: [...], weight: W}}, e.g. {EXAMPLE_MIXTURE}")
        sources = group["sources"]
        if isinstance(sources, str) or not isinstance(sources, list) or not sources or \
                not all(isinstance(x, str) and x.strip() for x in sources):
            example = f"sources: [{sources}]" if isinstance(sources, str) and sources.strip() else "sources: [web/*.jsonl]"
            raise ValueError(f"{where}.sources must be a non-empty list of files, dirs, globs or URLs, e.g. {example}")
        weight = group.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight is {weight!r}; must be a number > 0")
    if phases and not mixture:
        raise ValueError("data.mixture_phases needs data.mixture (the groups whose weights it changes)")
    last = 0
    for i, phase in enumerate(phases or []):
        where = f"data.mixture_phases[{i}]"
        if not isinstance(phase, dict) or set(phase) != {"step", "weights"}:
            raise ValueError(f"{where}: a phase is {{step: S, weights: {{group: W, ...}}}}")
        step, weights = phase["step"], phase["weights"]
        if isinstance(step, bool) or not isinstance(step, int) or step <= last:
            raise ValueError(f"{where}.step is {step!r}; must be an integer >= 1 and above the previous phase's")
        last = step
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"{where}.weights must map groups to weights")
        unknown = sorted(set(weights) - set(mixture))
        if unknown:
            raise ValueError(f"{where}.weights names {unknown}, not groups of data.mixture ({sorted(mixture)})")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or \
                not any(w > 0 for w in weights.values()):
            raise ValueError(f"{where}.weights: numbers >= 0, at least one > 0")
