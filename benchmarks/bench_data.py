"""Data benchmark: raw encoding vs the shard stage (1 and 2 Ray workers) vs the loader.

    python benchmarks/bench_data.py                      # the stdlib corpus, a fresh 8k BPE tokenizer
    python benchmarks/bench_data.py --tokenizer runs/demo/tokenizer/tokenizer.model --workers 1 2
    python benchmarks/bench_data.py --hf                 # + a Hugging Face byte-level BPE beside SentencePiece
    python benchmarks/bench_data.py --hf-tokenizer ckpt/ # + a given tokenizer.json (or a folder holding one)

Prints the machine, the command, and, over --rounds interleaved rounds (median and min-max):
  raw sentencepiece  MB/s of SentencePiece encoding the corpus in one thread (per core)
  raw word cache     the same through tokenizer/wordcache.py (each distinct word once; a cold cache per round)
  raw fast encoder   the same through tokenizer/fast.py (Hugging Face `tokenizers`, one thread)
  raw hf tokenizer   (--hf, --hf-tokenizer) a Hugging Face tokenizer.json (tokenizer/hf.py), one thread;
                     --hf trains a byte-level BPE (GPT-NeoX style) of the same vocabulary size on the same sample
  raw ..., 2 processes  the corpus split over 2 plain processes (a forked pool, no Ray): what this
                     machine itself gives 2 workers; "ceiling" is its ratio to 1 thread
  shard stage        MB/s of the shard stage end to end (read, split, encode, pack, write tar + manifest)
                     with N Ray workers, per core against raw SentencePiece (goal >= 1.2x); with the hf
                     tokenizer too (--hf): each worker encodes in `tokenizers`' own threads (CPUs / workers)
  scaling            shard stage 2 workers / 1 worker, per round (goal >= 1.9x)
  where the time went  per shard row (medians): the driver outside the tasks, the tasks' encoding and
                     the rest of their work (read, split, pack, write, hash), and the workers' idle time
                     (workers x the tasks' wall time - the tasks' own time: start-up, imbalance, waiting)
  loader          tokens/s ShardLoader yields in one process (num_workers=0; target >= 1M)
  global loader   tokens/s of the training order (xlp.pipeline.data.order.GlobalLoader), one process
Ray is started (and its workers warmed) before the timed runs: a stage in `xlp run` finds it running.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from xlp.xlstm_model.machine import cpu_name


_FORKED: dict = {}  # what the forked pool's processes encode: set before the fork, inherited


def word_cache_encode(tok, docs: list[str]) -> None:
    """The word cache as the shard stage runs it: its batches (256K characters), a new (cold) cache."""
    from xlp.pipeline.data.work import ShardJob
    from xlp.tokenizer.wordcache import WordCacheEncoder

    enc, batch, size = WordCacheEncoder(tok), [], 0
    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= ShardJob.encode_batch_chars:
            enc.encode_batch(batch)
            batch, size = [], 0
    enc.encode_batch(batch)


def _encode_half(job: tuple[str, int]) -> None:
    kind, half = job
    tok, docs = _FORKED["tok"], _FORKED["docs"][half::2]
    if kind == "sentencepiece":
        tok.encode_batch(docs, num_threads=1)
    else:
        word_cache_encode(tok, docs)


def machine() -> str:
    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import ray
    import sentencepiece
    import torch

    try:
        import tokenizers

        hf = f", tokenizers {tokenizers.__version__}"
    except ImportError:
        hf = ""
    return (f"{cpu}, {cores} cores usable; python {platform.python_version()}, torch {torch.__version__}, "
            f"ray {ray.__version__}, sentencepiece {sentencepiece.__version__}{hf}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_data.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="+", default=["stdlib"], help="data.sources (default: stdlib)")
    ap.add_argument("--tokenizer", help="a SentencePiece .model (default: train an 8k BPE on a sample)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    ap.add_argument("--partition-mb", type=float, default=None, help="data.partition_bytes in MiB")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--loader-batches", type=int, default=400)
    ap.add_argument("--streams", type=int, default=8, help="data.streams of the global loader row")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (median, spread)")
    ap.add_argument("--hf", action="store_true",
                    help="also time a Hugging Face byte-level BPE (tokenizers) of --vocab-size trained on the "
                    "same sample")
    ap.add_argument("--hf-tokenizer", help="also time this Hugging Face tokenizer.json (or a folder holding one)")
    ap.add_argument("--compare-encoders", action="store_true",
                    help="also time the shard stage with data.encoder=sentencepiece")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    import logging

    import ray

    from xlp import tokenizer as tk
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.data.loader import ShardLoader
    from xlp.pipeline.data.order import GlobalLoader
    from xlp.pipeline.data.readers import ReadStats, iter_documents, resolve_sources
    from xlp.pipeline.core.layout import RunLayout
    from xlp.pipeline.core.stage import StageContext
    from xlp.pipeline.stages import shard as shard_stage

    print(f"machine: {machine()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), 'benchmarks/bench_data.py'] + (argv if argv is not None else sys.argv[1:]))}")
    results: dict = {"machine": machine(), "argv": argv if argv is not None else sys.argv[1:]}

    stats = ReadStats()
    t = time.perf_counter()
    docs = [d for f in resolve_sources(args.sources, stats=stats) for d in iter_documents(f, stats=stats)]
    nbytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    print(f"corpus: {args.sources}: {len(docs)} documents, {nbytes / 1e6:.1f} MB (read in {time.perf_counter() - t:.1f}s)")

    work = Path(tempfile.mkdtemp(prefix="xlp-bench-data-"))
    pool = None  # 2 plain processes for the machine's own 2-process rate
    try:
        if args.tokenizer:
            tok = tk.load(args.tokenizer)
        else:
            t = time.perf_counter()
            tok = tk.train(docs[::8], vocab_size=args.vocab_size, num_threads=os.cpu_count() or 1)
            print(f"tokenizer: trained BPE vocab {tok.vocab_size} on every 8th document in {time.perf_counter() - t:.1f}s")
        trained = RunLayout(work)  # the tokenizer stage's output, copied into each run below
        trained.tokenizer_dir.mkdir()
        tok.save(trained.tokenizer_model)
        hf_tok = None
        if args.hf_tokenizer:
            hf_tok = tk.load(args.hf_tokenizer)
        elif args.hf:
            t = time.perf_counter()
            hf_tok = tk.train_bytelevel_bpe(docs[::8], vocab_size=args.vocab_size)
            print(f"hf tokenizer: trained byte-level BPE vocab {hf_tok.vocab_size} on every 8th document in "
                  f"{time.perf_counter() - t:.1f}s")
        hf_trained = RunLayout(work / "hf")
        if hf_tok is not None:
            hf_tok.save_to(hf_trained.tokenizer_dir)
            for name, one in (("sentencepiece", tok), ("hf tokenizer", hf_tok)):
                n_tok = sum(map(len, one.encode_batch(docs[::16], num_threads=1)))
                sample = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs[::16])
                print(f"compression, {name}: {sample / n_tok:.2f} bytes per token (every 16th document)")

        if max(args.workers) >= 2:  # forked now, before Ray's threads exist in this process
            from multiprocessing import get_context

            _FORKED.update(tok=tok, docs=docs)
            pool = get_context("fork").Pool(2)

        from xlp.tokenizer.fast import check, set_threads

        set_threads(1)  # the raw rows are per core
        fast, agreement = check(tok, docs)
        print(f"fast encoder (tokenizers, tokenizer/fast.py): ids identical to SentencePiece on all {agreement.docs} "
              f"documents" if agreement.identical else f"fast encoder: not used ({agreement.reason})")

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)

        @ray.remote(num_cpus=1)
        def warm() -> int:
            import xlp.pipeline.data.work  # noqa: F401
            from xlp import tokenizer  # noqa: F401

            time.sleep(0.5)
            return os.getpid()

        ray.get([warm.remote() for _ in range(max(args.workers))])

        def shard_rate(n: int, encoder: str) -> float:
            run = RunLayout(work / f"run{n}-{encoder}")
            if not run.tokenizer_dir.exists():  # encoder "hf": the Hugging Face tokenizer's run
                shutil.copytree(hf_trained.tokenizer_dir if encoder == "hf" else trained.tokenizer_dir,
                                run.tokenizer_dir)
            run.shard_dir.mkdir(exist_ok=True)
            ov = [f"data.sources={json.dumps(args.sources)}", f"data.num_workers={n}",
                  f"data.seq_len={args.seq_len}", f"data.encoder={'auto' if encoder == 'hf' else encoder}"]
            if args.partition_mb:
                ov.append(f"data.partition_bytes={int(args.partition_mb * (1 << 20))}")
            ctx = StageContext(name="shard", cfg=load_config(None, ov), run_dir=run.root, fingerprint="bench")
            t = time.perf_counter()
            m = shard_stage.run(ctx)  # not resumed: it starts from an empty shard dir each time
            wall = time.perf_counter() - t
            results.setdefault("shard_stage", {})[f"{n}w-{encoder}"] = {k: m[k] for k in (
                "tokens", "partitions", "shards", "encoder", "encoder_partitions", "wordcache")}
            times.setdefault((n, encoder), []).append({
                "stage": wall, "driver": wall - m["shard_seconds"], "encode": m["encode_seconds"],
                "task other": m["task_seconds"] - m["encode_seconds"],
                "idle workers": n * m["shard_seconds"] - m["task_seconds"]})
            return nbytes / wall / 1e6

        def raw(encode) -> float:
            t = time.perf_counter()
            encode(docs)
            return nbytes / (time.perf_counter() - t) / 1e6

        # Every measurement once per round, rounds interleaved: drift on a shared machine spreads over
        # all rows alike instead of passing for a difference between them.
        rows: dict[str, list[float]] = {}
        times: dict[tuple[int, str], list[dict]] = {}
        measures = {"raw sentencepiece, 1 thread": lambda: raw(lambda d: tok.encode_batch(d, num_threads=1))}
        from xlp.tokenizer.wordcache import reason_not_exact

        exact = reason_not_exact(tok) is None
        if exact:  # batches of the shard stage's size, a new (cold) cache each round
            measures["raw word cache, 1 thread"] = lambda: raw(lambda d: word_cache_encode(tok, d))
        if pool is not None:
            def two_processes(kind: str) -> float:
                t = time.perf_counter()
                pool.map(_encode_half, [(kind, 0), (kind, 1)])
                return nbytes / (time.perf_counter() - t) / 1e6

            measures["raw sentencepiece, 2 processes"] = lambda: two_processes("sentencepiece")
            if exact:
                measures["raw word cache, 2 processes"] = lambda: two_processes("wordcache")
        if fast is not None:
            measures["raw fast encoder, 1 thread"] = lambda: raw(fast.encode_batch)
        if hf_tok is not None:
            measures["raw hf tokenizer, 1 thread"] = lambda: raw(lambda d: hf_tok.encode_batch(d, num_threads=1))
        encoders = ["auto", "sentencepiece"] if args.compare_encoders else ["auto"]
        if hf_tok is not None:
            encoders.append("hf")
        for n in args.workers:
            for enc in encoders:
                what = "hf tokenizer" if enc == "hf" else f"data.encoder={enc}"
                measures[f"shard stage, {n} worker{'s' if n > 1 else ''}, {what}"] = (
                    lambda n=n, enc=enc: shard_rate(n, enc))
        for r in range(args.rounds):
            for name, measure in measures.items():
                rows.setdefault(name, []).append(measure())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1]:.2f}" for v in rows.values()) + " MB/s",
                  flush=True)

        def median(v: list[float]) -> float:
            v = sorted(v)
            return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2

        spm = median(rows["raw sentencepiece, 1 thread"])
        print(f"\n{'':52s} {'median MB/s':>11s} {'min-max':>13s} {'per core vs raw SentencePiece':>30s}")
        for name, v in rows.items():
            n = 2 if name.endswith("2 processes") else int(name.split(", ")[1].split()[0]) if name.startswith("shard") else 1
            ratio = median(v) / (n * spm)
            print(f"{name:52s} {median(v):11.2f} {min(v):6.2f}-{max(v):<6.2f} {ratio:29.2f}x")
            results.setdefault("rows", {})[name] = {"mb_s": v, "median": median(v), "per_core_vs_raw_spm": ratio}
        for enc in encoders:
            what = "hf tokenizer" if enc == "hf" else f"data.encoder={enc}"
            one = rows.get(f"shard stage, 1 worker, {what}")
            two = rows.get(f"shard stage, 2 workers, {what}")
            if one and two:
                per_round = [b / a for a, b in zip(one, two)]
                results[f"scaling_2w_over_1w_{enc}"] = per_round
                print(f"scaling, {what}: 2 workers / 1 worker = {median(per_round):.2f}x "
                      f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)}; goal >= 1.9x)")
        for kind in ("sentencepiece", "word cache"):
            one, two = rows.get(f"raw {kind}, 1 thread"), rows.get(f"raw {kind}, 2 processes")
            if one and two:
                per_round = [b / a for a, b in zip(one, two)]
                results[f"ceiling_2p_over_1_{kind.replace(' ', '')}"] = per_round
                print(f"ceiling, raw {kind}: 2 processes / 1 thread = {median(per_round):.2f}x "
                      f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)}; what 2 workers could reach here)")
        if hf_tok is not None:
            hf_raw = median(rows["raw hf tokenizer, 1 thread"])
            for n in args.workers:
                v = rows[f"shard stage, {n} worker{'s' if n > 1 else ''}, hf tokenizer"]
                print(f"shard stage, {n} worker(s), hf tokenizer: {median(v) / (n * hf_raw):.2f}x raw hf "
                      "tokenizer per core")
        print("goal: the shard stage at >= 1.2x raw SentencePiece per core")
        print(f"\nwhere the shard stage's time went (medians over rounds, seconds):\n{'':40s}" +
              "".join(f"{k:>14s}" for k in ("stage", "driver", "encode", "task other", "idle workers")))
        for (n, enc), per_round in times.items():
            med = {k: median([r[k] for r in per_round]) for k in per_round[0]}
            results.setdefault("time_split", {})[f"{n}w-{enc}"] = med
            what = "hf tokenizer" if enc == "hf" else f"data.encoder={enc}"
            print(f"{f'{n} worker(s), {what}':40s}" + "".join(f"{med[k]:14.2f}" for k in med))

        shard_dir = RunLayout(work / f"run{args.workers[-1]}-auto").shard_dir
        loader = ShardLoader(shard_dir, split="train", seq_len=args.seq_len, batch_size=args.batch_size)
        it = iter(loader)
        next(it)  # first shard loaded
        t = time.perf_counter()
        n_tok = sum(b["input_ids"].numel() for b in itertools.islice(it, args.loader_batches))
        dt = time.perf_counter() - t
        results["loader_tokens_s"] = n_tok / dt
        print(f"loader: {n_tok / dt / 1e6:.2f}M tokens/s in one process (seq_len {args.seq_len}, "
              f"batch {args.batch_size}, {args.loader_batches} batches, num_workers=0)")
        # what training reads through: the global row order (data.streams streams, row hashes)
        loader = GlobalLoader(shard_dir, seq_len=args.seq_len, micro_batch_size=args.batch_size,
                              rows_per_step=args.batch_size, streams=args.streams)
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        n_tok = sum(b["input_ids"].numel() for b in itertools.islice(it, args.loader_batches))
        dt = time.perf_counter() - t
        results["global_loader_tokens_s"] = n_tok / dt
        print(f"global loader: {n_tok / dt / 1e6:.2f}M tokens/s in one process (the training order: "
              f"data.streams={args.streams}, 1 rank, num_workers=0)")
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(work, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (numbers are noisy above the core count)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
