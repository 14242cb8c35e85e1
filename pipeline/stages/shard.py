"""The `shard` stage: tokenize the corpus into WebDataset tar shards plus manifest.json.

One Ray task per partition of the corpus reads its documents, puts each in train or val by a hash of
its text (stable when data is added), optionally drops exact duplicates (data.dedup, found by a first
pass over document hashes), encodes it with the tokenizer stage's model, appends <eos>, and writes
shards (see pipeline/data/shards.py). With `data.mixture`, each group's files are partitioned apart
and its shards are tagged with the group (manifest `shards[].group`; tokens per group and split under
`groups`), so the loader draws from each group by weight. Deterministic: the same input and config give
byte-identical shards. Resumable: after a kill, a rerun keeps the finished shards and partitions that still match
their records (size, sha256: a bad one is rewritten, counted in shards_damaged) and writes the rest.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from xlp import tokenizer as tk
from xlp.pipeline.core import registry
from xlp.pipeline.core.config import section
from xlp.pipeline.core.diskfull import writing
from xlp.pipeline.core.secrets import redact
from xlp.pipeline.core.stage import StageContext, atomic_write_json
from xlp.pipeline.data.parallel import default_workers, run_parallel
from xlp.pipeline.data.readers import ReadStats, partition_digest, plan_partitions, resolve_sources
from xlp.pipeline.data.shards import (
    META_DIR,
    SPLITS,
    build_manifest,
    dtype_name,
    remove_all,
    remove_incomplete,
    remove_shards_from,
    token_dtype,
)
from xlp.pipeline.data.work import (
    HashJob,
    ReadOptions,
    ShardJob,
    duplicates,
    hash_partition,
    load_part_record,
    near_val,
    part_record_path,
    shard_partition,
    verify_finished_partition,
)
from xlp.pipeline.stages.tokenizer import read_metrics

STAGE = registry.SHARD


def run(ctx: StageContext) -> dict:
    t0 = time.time()
    dc = section(ctx.cfg, "data")
    layout = ctx.layout
    out = layout.shard_dir
    out.mkdir(parents=True, exist_ok=True)
    if ctx.resumed:
        remove_incomplete(out)
    else:
        remove_all(out)
    tok = tk.load(layout.tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    stats = ReadStats()
    # partitions never mix data.mixture groups: each group's shards stay apart (tagged with the group)
    parts, part_groups = [], []
    for group, sources in dc.source_groups():
        files = resolve_sources(sources, fmt=dc.format, on_error=dc.on_error, partition_bytes=dc.partition_bytes,
                                stats=stats)
        for part in plan_partitions(files, dc.partition_bytes):
            parts.append(part)
            part_groups.append(group)
    sizes = [sum(f.size for f in p) for p in parts]
    plans = [partition_digest(p) for p in parts]
    total = sum(sizes)
    opts = ReadOptions(text_field=dc.text_field, on_error=dc.on_error, max_doc_bytes=dc.max_doc_bytes)

    drops: list[list[int]] = [[] for _ in parts]
    t_dedup = 0.0
    if dc.dedup:
        t1 = time.time()
        hashes = run_parallel(hash_partition, [HashJob(files=p, opts=opts) for p in parts],
                              num_workers=dc.num_workers, total_bytes=total, desc="shard dedup",
                              progress_dir=out / ".progress")
        drops = duplicates(hashes)
        t_dedup = time.time() - t1

    records: dict[int, dict] = {}
    damaged: list[str] = []  # kept shards that no longer match their records (rewritten)
    if ctx.resumed:
        for i in range(len(parts)):
            rec = load_part_record(out, i)
            # a partition finished from other files (the partitioning changed) is redone: its task
            # finds its shards' plan differs and rewrites them
            if rec is not None and rec.get("plan") == plans[i]:
                records[i] = rec
        # finished partitions keep their shards only when each matches its record (size, sha256;
        # threads: hashing releases the GIL); a partition with a bad one is redone

        with ThreadPoolExecutor(max_workers=4) as pool:
            checked = list(pool.map(lambda i: (i, verify_finished_partition(out, i)), sorted(records)))
        for i, problems in checked:
            if problems:
                del records[i]
                damaged.extend(problems)
        # partitions beyond today's count (the corpus was partitioned into more before): their shards
        # would enter the manifest beside the new ones; removed, each named in the stage's log
        for p in sorted({int(t.name.split("-")[1]) for t in out.glob("*.tar")} - set(range(len(parts)))):
            for split in SPLITS:
                remove_shards_from(out, split, p, 0)
            part_record_path(out, p).unlink(missing_ok=True)
            damaged.append(f"partition {p}: beyond the {len(parts)} partitions the corpus has now; its shards removed")
    todo = [i for i in range(len(parts)) if i not in records]
    tok_ref = tok  # pickled once per task as the model bytes
    workers = dc.num_workers or default_workers()
    threads = max(1, default_workers() // workers)  # workers x threads = the CPUs Ray has

    def job(i: int, force_val: Optional[float] = None) -> ShardJob:
        return ShardJob(partition=i, files=parts[i], opts=opts, out_dir=str(out), tokenizer=tok_ref,
                        dtype=dtype.str, val_fraction=dc.val_fraction, sample_tokens=dc.sample_tokens,
                        shard_bytes=dc.shard_bytes, drop=drops[i], group=part_groups[i], encoder=dc.encoder,
                        encoder_threads=threads, plan=plans[i], force_val=force_val)

    t1 = time.time()
    new = run_parallel(shard_partition, [job(i) for i in todo], num_workers=dc.num_workers, total_bytes=total,
                       done_bytes=sum(sizes[i] for i in records), desc="shard", progress_dir=out / ".progress")
    resumed_parts = len(records)
    for i, rec in zip(todo, new):
        records[i] = rec
        damaged.extend(rec.get("shards_damaged", []))
    # a group whose val split got no document (a corpus of a few documents): its train document with the
    # smallest split key goes there instead, its partition written again (deterministic: a function of
    # the corpus and data.val_fraction)
    forced = {}
    if dc.val_fraction > 0:
        for group, i, key in _groups_without_val(out, records, part_groups):
            print(f"shard: {_group_name(group)} got no val document at data.val_fraction={dc.val_fraction}: its "
                  f"train document with the smallest split key ({key:.4f}) goes to the val split (partition {i}'s "
                  "shards are written again)", flush=True)
            for split in SPLITS:
                remove_shards_from(out, split, i, 0)
            part_record_path(out, i).unlink(missing_ok=True)
            rec, = run_parallel(shard_partition, [job(i, force_val=key)], num_workers=1, total_bytes=sizes[i],
                                desc="shard", progress_dir=out / ".progress")
            records[i] = rec
            new.append(rec)
            forced[group] = key
    t_shard = time.time() - t1
    for problem in damaged:
        print(f"resume: {problem}", flush=True)
    for i in sorted(records):
        stats.merge(records[i]["stats"])

    config = {k.split(".", 1)[1]: v for k, v in
              {"data.val_fraction": dc.val_fraction, "data.dedup": dc.dedup, "data.sample_tokens": dc.sample_tokens,
               "data.shard_bytes": dc.shard_bytes, "data.partition_bytes": dc.partition_bytes,
               "data.format": dc.format, "data.text_field": dc.text_field,
               "data.max_doc_bytes": dc.max_doc_bytes}.items()}
    tok_info = {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    rm = read_metrics(stats)
    counts = {k: v for k, v in rm.items() if not isinstance(v, list)}
    manifest = build_manifest(out, dtype=dtype, tokenizer_info=tok_info, config=config,
                              read_counts=counts, per_source=stats.per_source,
                              listed={k: v for k, v in rm.items() if isinstance(v, list)})
    # per group, the train documents a larger data.val_fraction would move to val first (xlp.pipeline.data.fit)
    near: dict[str, list] = {}
    for i in sorted(records):
        near.setdefault(part_groups[i], []).extend(records[i].get("near_val", []))
    manifest["near_val"] = {group: near_val(docs) for group, docs in near.items()}
    if manifest["tokens"] == 0:  # an empty corpus fails here, not later in train

        raise ValueError(
            f"the corpus gave no tokens: data.sources {redact(list(dc.sources))} has "
            f"{counts.get('files', 0)} file(s), {counts.get('docs_read', 0)} document(s) read "
            f"({counts.get('docs_empty', 0)} empty, {counts.get('files_skipped', 0)} file(s) skipped); "
            "point data.sources at a non-empty corpus")
    empty = [g for g, _ in dc.source_groups() if g and not manifest.get("groups", {}).get(g, {}).get("train", {}).get("tokens")]
    if empty:  # a group the loader could never draw from fails here, not in train
        raise ValueError(f"data.mixture group(s) {empty} gave no training tokens: point their sources at "
                         "non-empty files (and check data.val_fraction)")

    with writing(layout.manifest):  # a full disk: DiskFull naming the manifest
        atomic_write_json(layout.manifest, manifest)

    elapsed = time.time() - t0
    metrics = dict(rm)
    metrics.update({
        "tokens": manifest["tokens"],
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "val_tokens": manifest["splits"]["val"]["tokens"],
        "train_docs": manifest["splits"]["train"]["docs"],
        "val_docs": manifest["splits"]["val"]["docs"],
        "shards": len(manifest["shards"]),
        "nodes": manifest["nodes"],  # where the shard tasks ran (the manifest has each shard's)
        "shards_written": sum(r.get("shards_written", 0) for r in new),
        "shards_kept": sum(r.get("shards_kept", 0) for r in new) + sum(
            records[i]["shards_written"] + records[i]["shards_kept"] for i in records if i not in todo),
        "partitions": len(parts),
        "partitions_resumed": resumed_parts,
        "shards_damaged": len(damaged),  # kept shards of an interrupted attempt that failed verification
        "dtype": dtype_name(dtype),
        "dedup_seconds": round(t_dedup, 2),
        "shard_seconds": round(t_shard, 2),
        # the shard tasks' own time (summed over tasks run now), and the part of it spent encoding
        "task_seconds": round(sum(r.get("seconds", 0.0) for r in new), 2),
        "encode_seconds": round(sum(r.get("encode_seconds", 0.0) for r in new), 2),
        "seconds": round(elapsed, 2),
        "input_mb_per_s": round(total / 1e6 / max(elapsed, 1e-9), 3),
        "per_source": manifest["sources"],
        **encoder_metrics([records[i] for i in sorted(records)]),
    })
    if dc.mixture:
        metrics["groups"] = manifest["groups"]
    if forced:  # the groups whose one val document was forced there (split key): none had hashed into it
        metrics["val_forced"] = forced
    return metrics


def _group_name(group: str) -> str:
    return f"data.mixture group {group!r}" if group else "the corpus"


def _groups_without_val(out: Path, records: dict[int, dict], part_groups: list[str]) -> list[tuple[str, int, float]]:
    """(group, partition, split key) for each group with train documents but no val document (read from
    the shard records): the partition holding its train document with the smallest split key, and that key."""
    docs: dict[str, dict[str, int]] = {}
    for meta in (out / META_DIR).glob("*.tar.json"):
        rec = json.loads(meta.read_text())
        counts = docs.setdefault(rec.get("group", ""), {split: 0 for split in SPLITS})
        counts[rec["split"]] = counts.get(rec["split"], 0) + rec["docs"]
    out_list = []
    for group, counts in sorted(docs.items()):
        if counts["val"] or counts["train"] < 2:  # one document is the train split; none to spare
            continue
        nearest = [(rec["near_val"][0][0], i) for i, rec in records.items()
                   if part_groups[i] == group and rec.get("near_val")]
        if nearest:
            key, i = min(nearest)
            out_list.append((group, i, key))
    return out_list


def encoder_metrics(records: list[dict]) -> dict:
    """Which encoder wrote the partitions, and what each candidate's check found (pipeline/data/work.py
    PartitionEncoder: the word cache, tokenizer/wordcache.py; `tokenizers`, tokenizer/fast.py)."""
    used = [r.get("encoder", "sentencepiece") for r in records]
    checks = [r["check"] for r in records if r.get("check")]
    candidates: dict[str, dict] = {}
    first_difference = None
    for check in checks:
        # a partition recorded before the word cache existed checked `tokenizers` alone
        trials = check.get("candidates") or {"fast": {**check, "s": check.get("fast_s", 0.0)}}
        for name, trial in trials.items():
            agg = candidates.setdefault(name, {"partitions": 0, "identical": True, "s": 0.0, "reason": ""})
            agg["partitions"] += 1
            agg["identical"] = agg["identical"] and bool(trial.get("identical"))
            agg["s"] = round(agg["s"] + trial.get("s", 0.0), 4)
            if not trial.get("identical") and not agg["reason"]:
                agg["reason"] = trial.get("reason", "")
                if trial.get("first_difference") and first_difference is None:
                    first_difference = {"encoder": name, "reason": trial.get("reason", ""), **trial["first_difference"]}
    caches = [r["wordcache"] for r in records if r.get("wordcache")]
    words = sum(c["words"] for c in caches)
    misses = sum(c["distinct_words_encoded"] for c in caches)
    return {
        "encoder": used[0] if used and len(set(used)) == 1 else "mixed" if used else "none",
        "encoder_partitions": {name: used.count(name) for name in sorted(set(used))},
        "encoder_check": {"partitions": len(checks), "docs": sum(c["docs"] for c in checks),
                          "chars": sum(c["chars"] for c in checks),
                          "sentencepiece_s": round(sum(c.get("sentencepiece_s", 0) for c in checks), 4),
                          "candidates": candidates, "first_difference": first_difference},
        "wordcache": {"partitions": len(caches), "words": words, "distinct_words_encoded": misses,
                      "hit_rate": round(1 - misses / words, 4) if words else None,
                      "fell_back": [c["fell_back"] for c in caches if c.get("fell_back")]},
    }