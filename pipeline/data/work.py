"""The per-partition work of the data stages (each runs as one Ray task via `run_parallel`).

- `sample_partition`: a uniform, deterministic sample of documents (tokenizer training + held-out).
- `hash_partition`:   16-byte digests of the documents (exact dedup across the whole corpus).
- `shard_partition`:  read, split train/val by document hash, tokenize, append <eos>, write shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from xlp.pipeline.core.schema.data import MAX_DOC_BYTES
from xlp.pipeline.data.readers import (
    FileRef,
    ReadStats,
    doc_hash,
    hash_unit,
    iter_documents,
)
from xlp.pipeline.data.shards import (
    META_DIR,
    REWRITE,
    SPLITS,
    ShardWriter,
    complete_shards,
    remove_shards_from,
    shard_name,
    verified_prefix,
)
from xlp.tokenizer.fast import check, first_difference, set_threads
from xlp.tokenizer.wordcache import WordCacheEncoder, reason_not_exact


@dataclass
class ReadOptions:
    text_field: str = "text"
    on_error: str = "fail"
    max_doc_bytes: int = MAX_DOC_BYTES  # longer documents reach the work functions split (readers.py)


def _docs(files: list[FileRef], opts: ReadOptions, stats: ReadStats, report):
    """(source, text) of every non-empty document of the files, in order; progress reported."""
    for ref in files:
        src = stats.src(ref.source)
        last = src["bytes"]
        reported = n = 0
        for text in iter_documents(ref, text_field=opts.text_field, on_error=opts.on_error, stats=stats,
                                   max_doc_bytes=opts.max_doc_bytes):
            n += 1
            yield ref.source, text
            if src["bytes"] - last > 1 << 20:  # a big file: report as it goes, up to its stored size
                step = min(src["bytes"] - last, max(0, ref.size - reported))
                report(step, n)
                reported += step
                last, n = src["bytes"], 0
        report(max(0, ref.size - reported), n)  # the bar's total is the files' sizes on storage


# ---------------------------------------------------------------------------------------------
# tokenizer sample


@dataclass
class SampleJob:
    files: list[FileRef]
    opts: ReadOptions
    rate: float  # P(document in the training sample)
    heldout_rate: float  # P(document in the held-out sample), disjoint from the training sample
    seed: int = 0


def sample_unit(text: str, seed: int) -> float:
    key = seed.to_bytes(8, "little", signed=False)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return hash_unit(digest)


def sample_partition(job: SampleJob, report) -> dict:
    stats = ReadStats()
    sample: list[str] = []
    heldout: list[str] = []
    for _, text in _docs(job.files, job.opts, stats, report):
        u = sample_unit(text, job.seed)
        if u < job.rate:
            sample.append(text)
        elif u < job.rate + job.heldout_rate:
            heldout.append(text)
    return {"sample": sample, "heldout": heldout, "stats": stats.to_dict()}


# ---------------------------------------------------------------------------------------------
# dedup


@dataclass
class HashJob:
    files: list[FileRef]
    opts: ReadOptions


def hash_partition(job: HashJob, report) -> bytes:
    stats = ReadStats()
    return b"".join(doc_hash(text) for _, text in _docs(job.files, job.opts, stats, report))


def duplicates(hashes: list[bytes]) -> list[list[int]]:
    """Per partition, the indices of documents whose text appeared before (in partition order)."""
    counts = [len(h) // 16 for h in hashes]
    if not sum(counts):
        return [[] for _ in hashes]
    allh = np.frombuffer(b"".join(hashes), dtype="S16")
    _, first = np.unique(allh, return_index=True)
    dup = np.ones(len(allh), dtype=bool)
    dup[first] = False
    out, start = [], 0
    for c in counts:
        out.append(np.nonzero(dup[start:start + c])[0].tolist())
        start += c
    return out


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class ShardJob:
    partition: int
    files: list[FileRef]
    opts: ReadOptions
    out_dir: str
    tokenizer: object  # tokenizer.Tokenizer or HFTokenizer (pickles as its file's bytes)
    dtype: str
    val_fraction: float
    sample_tokens: int
    shard_bytes: int
    drop: list[int] = field(default_factory=list)  # indices of duplicate documents in this partition
    group: str = ""  # the data.mixture group of the partition's files ("": no mixture)
    encode_batch_chars: int = 1 << 18
    encoder: str = "auto"  # data.encoder: auto (the quickest encoder that agrees) | sentencepiece
    encoder_threads: int = 1  # threads of the fast or Hugging Face encoder (workers x threads = the CPUs)
    plan: str = ""  # readers.partition_digest(files): kept shards must have been written from these files
    # the split key of a document that goes to val whatever data.val_fraction says: its group's val
    # split got no document otherwise (xlp.pipeline.stages.shard)
    force_val: Optional[float] = None


class PartitionEncoder:
    """The partition's encoder; the ids it writes are always SentencePiece's.

    data.encoder=sentencepiece: SentencePiece. data.encoder=auto: the first batch is encoded by
    SentencePiece (its ids are the ones written) and by the candidates the model allows, compared
    document by document:
    - wordcache (tokenizer/wordcache.py): SentencePiece word by word, each distinct word once. Exact by
      construction where the model allows it; about twice SentencePiece's rate on real text, where most
      words repeat. Text that hardly repeats a word costs it more than SentencePiece (it encodes nearly
      every word and looks each up too), so if fewer than MIN_HIT_RATE of the words of the batches
      after the first came from the cache, SentencePiece encodes the rest. A count, not a timing: the
      choice is the same on a busy machine and an idle one.
    - fast (tokenizer/fast.py, Hugging Face `tokenizers`): tried only where the word cache cannot be
      made; used only if it was also the quicker on the first batch.
    The partition's record says which encoded it, what the check found, and why.

    A Hugging Face tokenizer (tokenizer/hf.py) is its own encoder ("tokenizers"): batched, in the library's
    own thread pool of `threads` threads; data.encoder does not apply (there is nothing to compare with)."""

    WARMUP_BATCHES = 3  # word-cache batches after the check before its hit rate is judged
    MIN_HIT_RATE = 0.5  # below this share of words from the cache, SentencePiece is the quicker

    def __init__(self, tok, mode: str, threads: int):
        self.tok, self.mode, self.threads = tok, mode, threads
        self.encoder = None  # the candidate in use (None: SentencePiece)
        self.name = "sentencepiece"
        self.checked: Optional[dict] = None  # the check's result (None: not made, data.encoder=sentencepiece)
        self.batches = 0  # word-cache batches after the check
        self.judged_from = (0, 0)  # the word cache's (words, misses) after the check's batch
        self.fell_back: Optional[str] = None
        self.wordcache = None  # the word-cache encoder, once it agreed (kept for its statistics)

    def _check(self, texts: list[str]) -> list[list[int]]:
        chars = sum(map(len, texts))
        t = time.perf_counter()
        want = self.tok.encode_batch(texts, num_threads=1)
        spm_s = time.perf_counter() - t
        self.checked = {"docs": len(texts), "chars": chars, "sentencepiece_s": round(spm_s, 4), "candidates": {}}
        reason = reason_not_exact(self.tok)
        if reason is None:
            encoder = WordCacheEncoder(self.tok)
            t = time.perf_counter()
            got = encoder.encode_batch(texts)
            trial = {"s": round(time.perf_counter() - t, 4), "first_difference": first_difference(want, got, "wordcache")}
            trial["identical"] = trial["first_difference"] is None
            trial["reason"] = "" if trial["identical"] else f"ids differ in sample document {trial['first_difference']['doc']}"
            self.checked["candidates"]["wordcache"] = trial
            if trial["identical"]:
                self.encoder = self.wordcache = encoder
                self.name = "wordcache"
                self.judged_from = (encoder.words, encoder.misses)  # the hit rate is judged without this batch
                return want
        else:
            self.checked["candidates"]["wordcache"] = {"identical": False, "reason": f"not exact: {reason}"}
        set_threads(self.threads)
        fast, agreement = check(self.tok, texts)
        trial = agreement.to_dict()
        trial["s"] = trial.pop("fast_s")
        self.checked["candidates"]["fast"] = trial
        if agreement.faster:
            self.encoder, self.name = fast, "fast"
        return want

    def encode_batch(self, texts: list[str]) -> list:
        if getattr(self.tok, "kind", "spm") == "hf":
            self.name = "tokenizers"
            return self.tok.encode_batch(texts, num_threads=self.threads)
        if self.mode == "sentencepiece":
            return self.tok.encode_batch(texts, num_threads=1)
        if self.checked is None:
            return self._check(texts)
        if self.encoder is None:
            return self.tok.encode_batch(texts, num_threads=1)
        if self.name != "wordcache":
            return self.encoder.encode_batch(texts)
        ids = self.encoder.encode_batch(texts)
        self.batches += 1
        if self.batches == self.WARMUP_BATCHES:
            words, misses = self.wordcache.words - self.judged_from[0], self.wordcache.misses - self.judged_from[1]
            hit_rate = 1 - misses / max(words, 1)
            if hit_rate < self.MIN_HIT_RATE:
                self.fell_back = (f"{hit_rate:.0%} of the words of batches 2-{self.batches + 1} came from the cache "
                                  f"(below {self.MIN_HIT_RATE:.0%}): SentencePiece is the quicker on such text")
                self.encoder, self.name = None, "sentencepiece"
        return ids

    def record(self) -> dict:
        """Which encoder wrote the partition (after a fall-back: SentencePiece) and what the check found."""
        rec = {"encoder": self.name, "check": self.checked}
        if self.wordcache is not None:
            rec["wordcache"] = {**self.wordcache.stats(), "fell_back": self.fell_back}
        return rec


NEAR_VAL = 16  # train documents recorded by their split key: the first a larger data.val_fraction moves


def near_val(docs: list) -> list[list]:
    """The NEAR_VAL train documents (split key, tokens) with the smallest split keys, in key order: a
    document goes to the val split when its key is below data.val_fraction, so these are the ones a
    larger val_fraction moves there first (xlp.pipeline.data.fit names a val_fraction that works from
    them). tokens None: not known (manifests written before a resumed partition counted the documents of
    the shards a killed attempt finished)."""
    return [list(d) for d in sorted(docs, key=lambda d: d[0])[:NEAR_VAL]]


def part_record_path(out_dir: Path, partition: int) -> Path:
    return Path(out_dir) / META_DIR / f"part-{partition:05d}.json"


def shard_partition(job: ShardJob, report) -> dict:
    """Tokenize one partition into shards; keeps the shards a killed attempt finished."""
    started = time.perf_counter()
    encode_s = 0.0
    out_dir = Path(job.out_dir)
    (out_dir / META_DIR).mkdir(parents=True, exist_ok=True)
    tok = job.tokenizer
    encoder = PartitionEncoder(tok, job.encoder, job.encoder_threads)
    eos = np.asarray([tok.eos_id], dtype=np.int64)
    stats = ReadStats()
    drop = set(job.drop)
    writers: dict[str, ShardWriter] = {}
    skip: dict[str, int] = {}  # documents of each split already inside finished shards
    kept_records: list[dict] = []
    damaged: list[str] = []  # kept shards that no longer match their records: rewritten
    for split in SPLITS:
        done = complete_shards(out_dir, split, job.partition, damaged, plan=job.plan)
        kept_records.extend(done)
        skip[split] = sum(r["docs"] for r in done)
        writers[split] = ShardWriter(
            out_dir, split, job.partition, dtype=np.dtype(job.dtype), sample_tokens=job.sample_tokens,
            shard_bytes=job.shard_bytes, start_index=len(done), start_sample=sum(r["samples"] for r in done),
            group=job.group, plan=job.plan)
    seen = {split: 0 for split in SPLITS}
    batch: list[tuple[str, str, str, float]] = []  # (split, source, text, split key)
    batch_chars = 0
    near: list[tuple[float, Optional[int]]] = []  # (split key, tokens) of train documents: near_val()

    def encode_and_write() -> None:
        nonlocal batch, batch_chars, encode_s
        if not batch:
            return
        t0 = time.perf_counter()
        ids = encoder.encode_batch([text for _, _, text, _ in batch])
        encode_s += time.perf_counter() - t0
        for (split, source, _, u), doc in zip(batch, ids):
            writers[split].add_doc(np.concatenate([np.asarray(doc, dtype=np.int64), eos]), source)
            if split == "train":
                near.append((u, len(doc) + 1))
        batch, batch_chars = [], 0
        near[:] = near_val(near)

    try:
        for i, (source, text) in enumerate(_docs(job.files, job.opts, stats, report)):
            if i in drop:
                stats.add(source, "docs_duplicate")
                continue
            stats.add(source, "docs_kept")
            u = hash_unit(doc_hash(text))
            split = "val" if u < job.val_fraction or u == job.force_val else "train"
            seen[split] += 1
            if seen[split] <= skip[split]:  # already in a finished shard
                if split == "train" and (len(near) < NEAR_VAL or u < max(k for k, _ in near)):
                    # among the near_val ones so far: encoded again for its token count (a few documents
                    # per partition), so the manifest is the one an uninterrupted attempt writes
                    near.append((u, len(encoder.encode_batch([text])[0]) + 1))
                    near[:] = near_val(near)
                continue
            batch.append((split, source, text, u))
            batch_chars += len(text)
            if batch_chars >= job.encode_batch_chars:
                encode_and_write()
        encode_and_write()
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    written = [r for w in writers.values() for r in w.finished]
    record = {"partition": job.partition, "files": len(job.files), "plan": job.plan, "stats": stats.to_dict(),
              "shards_written": len(written), "shards_kept": len(kept_records), "shards_damaged": damaged,
              "docs_written": {s: seen[s] - skip[s] for s in SPLITS}, "near_val": near_val(near),
              **encoder.record(),
              # where the task's time went (python benchmarks/bench_data.py prints the stage's sums)
              "seconds": round(time.perf_counter() - started, 4), "encode_seconds": round(encode_s, 4)}
    path = part_record_path(out_dir, job.partition)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return record


def verify_finished_partition(out_dir: Path, partition: int) -> list[str]:
    """A finished partition's shards checked against their records (size, sha256) before a resumed
    stage keeps them. Returns the problems (one line each, naming the shard); when there is one, the
    partition's record goes first, then its shards from the first bad one on (a kill in between
    leaves a partition that is redone, never one that looks finished with shards missing)."""
    out_dir = Path(out_dir)
    damaged: list[tuple[str, int, str]] = []  # (split, first bad index, problem)
    for split in SPLITS:
        good, problem = verified_prefix(out_dir, split, partition)
        name = shard_name(split, partition, len(good))
        if problem is None and (out_dir / META_DIR / f"{name}.json").is_file():  # recorded, not there
            problem = f"shard {out_dir / name}: missing; {REWRITE}"
        if problem is not None:
            damaged.append((split, len(good), problem))
    if damaged:
        part_record_path(out_dir, partition).unlink(missing_ok=True)
        for split, index, _ in damaged:
            remove_shards_from(out_dir, split, partition, index)
    return [problem for _, _, problem in damaged]


def load_part_record(out_dir: Path, partition: int) -> Optional[dict]:
    path = part_record_path(out_dir, partition)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
