"""Oversized-document benchmark: one single-line file of N GiB through the shard stage's worker.

    python benchmarks/bench_bigdoc.py --gib 2          # the issue's case (tokenizing 2 GiB takes a while)
    python benchmarks/bench_bigdoc.py --gib 0.1 0.25   # two sizes: peak RSS must not grow with the size

Writes a file of N GiB holding one line of real text (the standard library's sources, newlines
replaced by spaces), trains a small BPE tokenizer on 2 MB of it, then runs `shard_partition` (what
each Ray task of the shard stage runs: read, split at data.max_doc_bytes, hash, tokenize, pack,
write tar shards) on the file in a fresh child process, and prints the child's peak resident memory
(VmHWM), its memory after imports, the time, and the counts. Goal: peak RSS under 1 GiB at 2 GiB.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30


def vm_kib(key: str) -> int:
    """VmHWM (peak) or VmRSS of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def write_single_line(path: Path, nbytes: int) -> None:
    """`nbytes` of stdlib text with every newline made a space, written in 8 MiB pieces."""
    from xlp.pipeline.data.readers import stdlib_files

    block = bytearray()
    for p in stdlib_files("email") + stdlib_files("json") + stdlib_files("logging"):
        block += Path(p).read_bytes().replace(b"\r", b" ").replace(b"\n", b" ")
        if len(block) >= 8 << 20:
            break
    block = bytes(block)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            piece = block[: min(len(block), left)]
            f.write(piece)
            left -= len(piece)


def _child(path: str, tok_path: str, out_dir: str, max_doc_bytes: int, q) -> None:
    import numpy as np  # noqa: F401

    from xlp import tokenizer as tk
    from xlp.pipeline.data.readers import FileRef
    from xlp.pipeline.data.shards import token_dtype
    from xlp.pipeline.data.work import ReadOptions, ShardJob, shard_partition

    tok = tk.load(tok_path)
    after_imports = vm_kib("VmRSS")
    t = time.perf_counter()
    ref = FileRef(source=path, url=path, size=os.path.getsize(path), fmt="text")
    job = ShardJob(partition=0, files=[ref], opts=ReadOptions(max_doc_bytes=max_doc_bytes), out_dir=out_dir,
                   tokenizer=tok, dtype=token_dtype(tok.vocab_size).str, val_fraction=0.0,
                   sample_tokens=2048, shard_bytes=128 << 20)
    rec = shard_partition(job, lambda *a: None)
    q.put({"seconds": time.perf_counter() - t, "peak_kib": vm_kib("VmHWM"), "after_imports_kib": after_imports,
           "totals": {k: v for s in rec["stats"]["per_source"].values() for k, v in s.items()},
           "shards": rec["shards_written"]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_bigdoc.py", description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[2.0], help="file sizes in GiB (one run each)")
    ap.add_argument("--max-doc-mb", type=float, default=None, help="data.max_doc_bytes in MiB (default: the config's)")
    ap.add_argument("--dir", help="where the file and shards go (default: a temporary dir; needs N GiB x ~1.5)")
    args = ap.parse_args(argv)

    from xlp import tokenizer as tk
    from xlp.pipeline.core.schema.data import MAX_DOC_BYTES

    from bench_data import machine  # benchmarks/ is sys.path[0] when this file runs as a script

    limit = int(args.max_doc_mb * (1 << 20)) if args.max_doc_mb else MAX_DOC_BYTES
    print(f"machine: {machine()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), 'benchmarks/bench_bigdoc.py'] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"data.max_doc_bytes: {limit} ({limit / (1 << 20):g} MiB)")
    work = Path(tempfile.mkdtemp(prefix="xlp-bench-bigdoc-", dir=args.dir))
    try:
        sample = work / "sample.txt"
        write_single_line(sample, 2 << 20)
        text = sample.read_text()
        tok = tk.train([text[i:i + 4096] for i in range(0, len(text), 4096)], vocab_size=8000,
                       num_threads=os.cpu_count() or 1)
        tok_path = work / "tok.model"
        tok.save(tok_path)
        ctx = mp.get_context("spawn")
        for gib in args.gib:
            path = work / f"line-{gib:g}GiB.txt"
            t = time.perf_counter()
            write_single_line(path, int(gib * GiB))
            print(f"wrote {path.name}: {path.stat().st_size / GiB:g} GiB, one line, in {time.perf_counter() - t:.1f}s")
            out = work / f"shards-{gib:g}"
            out.mkdir()
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(str(path), str(tok_path), str(out), limit, q))
            p.start()
            r = q.get()
            p.join()
            tot = r["totals"]
            mb = path.stat().st_size / 1e6
            print(f"{gib:g} GiB single line: worker peak RSS {r['peak_kib'] / 1024:.0f} MiB "
                  f"(after imports {r['after_imports_kib'] / 1024:.0f} MiB); {r['seconds']:.1f}s "
                  f"({mb / r['seconds']:.2f} MB/s); docs_split={tot['docs_split']} split_pieces={tot['split_pieces']} "
                  f"docs_kept={tot['docs_kept']} shards={r['shards']}")
            path.unlink()
            shutil.rmtree(out)
        print(f"max RSS of any child (getrusage): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
