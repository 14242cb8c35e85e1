"""The `tokenizer` stage: train SentencePiece (or, tokenizer.type=bytelevel_bpe, a Hugging Face
byte-level BPE) on a uniform sample of the corpus, or take `tokenizer.path` (a SentencePiece model, a
Hugging Face tokenizer.json or a folder holding one), and measure chars per token on a held-out sample.

Outputs in RUN_DIR/tokenizer/: tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face, with a
tokenizer_config.json naming its special tokens when its config did), tokenizer.vocab (piece<TAB>id),
stats.json. The sample is drawn in parallel, one Ray task per partition of the corpus: a document is
in it when a keyed hash of its text falls under tokenizer.sample_bytes / corpus bytes, so the sample
is uniform over documents and the same on every run.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from xlp import tokenizer as tk
from xlp.pipeline.core import registry
from xlp.pipeline.core.config import section
from xlp.pipeline.core.schema.tokenizer import TokenizerConfig, fixed_pieces, suggested_vocab
from xlp.pipeline.core.stage import StageContext, atomic_write_json, atomic_write_text
from xlp.pipeline.data.parallel import default_workers, run_parallel
from xlp.pipeline.data.readers import ReadStats, plan_partitions, resolve_sources
from xlp.pipeline.data.work import ReadOptions, SampleJob, sample_partition

if TYPE_CHECKING:
    from xlp.pipeline.core.schema.data import DataConfig
    from xlp.pipeline.data.readers import ReadStats


STAGE = registry.TOKENIZER


def read_metrics(stats: ReadStats) -> dict:
    """The reader counts of a stage as flat metrics, plus the skipped files and bad records by name."""
    t = stats.totals()
    t["docs_kept"] = t["docs_read"] - t["docs_empty"] - t["docs_duplicate"]
    out = {k: t[k] for k in ("files", "files_skipped", "bytes", "docs_read", "docs_kept", "docs_empty",
                             "docs_duplicate", "replacement_chars", "bad_records", "blank_lines",
                             "docs_split", "split_pieces", "hidden_skipped", "symlink_loops")}
    out["skipped_files"] = stats.skipped
    out["bad_record_list"] = stats.bad_records
    out["not_read_list"] = stats.unread  # hidden names and symlink loops (capped; all are counted)
    return out


def run(ctx: StageContext) -> dict:
    t0 = time.time()
    dc: DataConfig = section(ctx.cfg, "data")
    tc: TokenizerConfig = section(ctx.cfg, "tokenizer")
    layout = ctx.layout
    stats = ReadStats()
    files = resolve_sources(dc.all_sources(), fmt=dc.format, on_error=dc.on_error,
                            partition_bytes=dc.partition_bytes, stats=stats)
    parts = plan_partitions(files, dc.partition_bytes)
    total = sum(f.size for f in files)
    if not tc.path and 0 < total < tc.vocab_size - fixed_pieces(tc.byte_fallback):
        # refused before sampling (SentencePiece names the exact bound after it)
        raise ValueError(
            f"tokenizer.vocab_size={tc.vocab_size} asks for more pieces than the corpus's {total} bytes of text "
            f"(data.sources) can give: set tokenizer.vocab_size={suggested_vocab(total, tc.byte_fallback)} (or add data)")
    rate = 0.0 if tc.path else min(1.0, tc.sample_bytes / max(1, total))
    heldout_rate = min(1.0 - rate, tc.heldout_bytes / max(1, total))
    if rate >= 1.0:  # everything trains the tokenizer: measure on (part of) the training sample
        heldout_rate = 0.0
    opts = ReadOptions(text_field=dc.text_field, on_error=dc.on_error, max_doc_bytes=dc.max_doc_bytes)
    jobs = [SampleJob(files=p, opts=opts, rate=rate, heldout_rate=heldout_rate, seed=tc.seed) for p in parts]
    results = run_parallel(sample_partition, jobs, num_workers=dc.num_workers, total_bytes=total,
                           desc="tokenizer sample", progress_dir=ctx.out_dir / ".progress")
    sample: list[str] = []
    heldout: list[str] = []
    for r in results:
        stats.merge(r["stats"])
        sample.extend(r["sample"])
        heldout.extend(r["heldout"])
    t_read = time.time() - t0

    t1 = time.time()
    if tc.path:
        tok = tk.load(tc.path)
        source = str(tc.path)
    else:
        if not sample:
            raise ValueError("tokenizer stage: the corpus has no documents to train on (data.sources)")
        threads = tc.num_threads or default_workers()
        if tc.type == "bytelevel_bpe":
            tok = tk.train_bytelevel_bpe(sample, vocab_size=tc.vocab_size)
        else:
            tok = tk.train(sample, vocab_size=tc.vocab_size, model_type=tc.type, byte_fallback=tc.byte_fallback,
                           character_coverage=tc.character_coverage, num_threads=threads, seed=tc.seed)
        source = "trained"
    t_train = time.time() - t1
    saved = tok.save_to(layout.tokenizer_dir)
    atomic_write_text(layout.tokenizer_vocab,
                      "".join(f"{tok.id_to_piece(i)}\t{i}\n" for i in range(tok.vocab_size)))
    measure = heldout if heldout else sample[: max(1, len(sample) // 10)]
    cpt = tk.chars_per_token(tok, measure, num_threads=tc.num_threads or default_workers())
    stats_json = {
        "model": saved.name,
        "kind": tok.kind,  # spm (SentencePiece) | hf (Hugging Face tokenizers)
        "source": source,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "type": tc.type if not tc.path else None,
        "specials": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id},
        "sample": {"docs": len(sample), "chars": sum(len(s) for s in sample), "rate": rate},
        "heldout": dict(cpt, measured_on="heldout" if heldout else "training sample"),
        "corpus": read_metrics(stats),
    }
    atomic_write_json(layout.tokenizer_stats, stats_json)
    metrics = read_metrics(stats)
    metrics.update({
        "vocab_size": tok.vocab_size,
        "chars_per_token": cpt["chars_per_token"],
        "bytes_per_token": cpt["bytes_per_token"],
        "heldout_docs": cpt["docs"],
        "sample_docs": len(sample),
        "sample_chars": stats_json["sample"]["chars"],
        "partitions": len(parts),
        "read_seconds": round(t_read, 2),
        "train_seconds": round(t_train, 2),
        "seconds": round(time.time() - t0, 2),
        "per_source": stats.per_source,
    })
    return metrics
