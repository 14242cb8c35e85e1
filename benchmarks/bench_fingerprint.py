"""Fingerprint benchmark: how long deciding what to rerun takes for a corpus of many files.

    python benchmarks/bench_fingerprint.py                 # 10,000 small files in a temporary directory
    python benchmarks/bench_fingerprint.py --files 100000 --repeat 3

Writes FILES small text files (100 per directory) under a temporary directory, sets
`data.sources` to it, and times (median of REPEAT, after one untimed warm-up):
  expand          the readers' expansion of the source (resolve_sources: walk + size per file)
  listing         the corpus listing the data stages hash (expand + one stat per file: size, mtime_ns)
  decision        fingerprints() of all stages: every listing made once, hashed, and the fingerprints
  run start       what `xlp run` computes before running anything: fingerprints() + trajectories()
Then it checks that adding one file changes the tokenizer and shard fingerprints and nothing else.
No file's content is read.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    from xlp.xlstm_model.machine import cpu_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {cores} cores usable; python {platform.python_version()}, {platform.system()}"


def make_corpus(root: Path, n: int, per_dir: int = 100) -> None:
    for i in range(n):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:07d}.txt").write_text(f"document {i}\n" * 8)


def timed(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm-up (imports, directory cache)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_fingerprint.py", description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000, help="input files to list (default 10000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--dir", help="make the files here instead of a temporary directory (it must not exist)")
    args = ap.parse_args(argv)

    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.data import listing
    from xlp.pipeline.data.readers import resolve_sources
    from xlp.pipeline.core.stage import fingerprints, trajectories
    from xlp.pipeline.core.registry import STAGES

    print(f"machine: {machine()}")
    print(f"command: python benchmarks/bench_fingerprint.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}")
    with tempfile.TemporaryDirectory(prefix="xlp-bench-fp-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp) / "corpus"
        root.mkdir(parents=True)
        t = time.perf_counter()
        make_corpus(root, args.files)
        print(f"made {args.files} files in {root} ({time.perf_counter() - t:.1f}s)")
        cfg = load_config(None, [f"data.sources=[{root}]", f"run.dir={Path(tmp) / 'run'}"])
        n = len(listing.corpus(cfg)[0]["files"])
        assert n == args.files, f"listed {n} files, made {args.files}"

        rows = [
            ("expand", lambda: resolve_sources([str(root)])),
            ("listing", lambda: listing.corpus(cfg)),
            ("decision", lambda: fingerprints(STAGES, cfg)),
            ("run start", lambda: (fingerprints(STAGES, cfg), trajectories(STAGES, cfg))),
        ]
        for name, fn in rows:
            med, best = timed(fn, args.repeat)
            print(f"{name:10s} {med * 1e3:9.1f} ms median  ({best * 1e3:.1f} ms best, {args.repeat} runs; "
                  f"{med / args.files * 1e6:.2f} us per file)")

        before = fingerprints(STAGES, cfg)
        (root / "d00000" / "added.txt").write_text("one more document\n")
        after = fingerprints(STAGES, cfg)
        changed = sorted(s for s in before if before[s] != after[s])
        print(f"after adding one file, changed fingerprints: {', '.join(changed)}")
        if not {"tokenizer", "shard"} <= set(changed):
            print("error: adding a file did not change the data stages' fingerprints", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
