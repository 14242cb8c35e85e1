"""Small real stages for the runner's tests: they read config keys, write files, and count their runs.

Importable by Ray workers because the tests put this folder on PYTHONPATH before Ray starts.
"""
from __future__ import annotations

import os
import time

from xlp.pipeline.core.stage import Stage, StageContext, atomic_write_text


def _count_call(ctx: StageContext) -> None:
    with open(ctx.run_dir / "calls.txt", "a") as f:
        f.write(f"{ctx.name} {'resumed' if ctx.resumed else 'fresh'}\n")


def numbers(ctx: StageContext) -> dict:
    _count_call(ctx)
    n = ctx.cfg.data.seq_len
    atomic_write_text(ctx.out_dir / "numbers.txt", "\n".join(str(i) for i in range(n)))
    print(f"wrote {n} numbers")
    return {"count": n}


def total(ctx: StageContext) -> dict:
    _count_call(ctx)
    values = [int(x) for x in (ctx.input_dir("numbers") / "numbers.txt").read_text().split()]
    # A stage that can be killed part way: it marks that it started, then waits if told to.
    (ctx.out_dir / "started").write_text(str(os.getpid()))
    # Short sleeps: Ray's cancel raises KeyboardInterrupt between Python bytecodes, as in real stages.
    until = time.time() + float(os.environ.get("TOY_STAGE_SLEEP", "0"))
    while time.time() < until:
        time.sleep(0.1)
    result = sum(values) * ctx.cfg.train.steps
    atomic_write_text(ctx.out_dir / "total.txt", str(result))
    return {"total": result}


def report(ctx: StageContext) -> dict:
    _count_call(ctx)
    text = (ctx.input_dir("total") / "total.txt").read_text()
    atomic_write_text(ctx.out_dir / "report.txt", f"total is {text}\n")
    return {"length": len(text)}


def broken(ctx: StageContext) -> dict:
    _count_call(ctx)
    raise ValueError("the input file example.jsonl line 3 is not JSON")


def undeclared(ctx: StageContext) -> dict:
    """Reads data.seq_len, which its declaration leaves out: its output would not follow that key."""
    _count_call(ctx)
    n = ctx.cfg.data.seq_len
    atomic_write_text(ctx.out_dir / "numbers.txt", str(n))
    return {"count": n}


TOY_STAGES = [
    Stage("numbers", reads=("data.seq_len",), needs=(), fn="toy_stages:numbers", headline=("count",)),
    Stage("total", reads=("train.steps",), needs=("numbers",), fn="toy_stages:total"),
    Stage("report", reads=(), needs=("total",), fn="toy_stages:report"),
]
UNDECLARED_STAGES = [Stage("undeclared", reads=("train.steps",), needs=(), fn="toy_stages:undeclared")]
BROKEN_STAGES = TOY_STAGES[:1] + [Stage("broken", reads=(), needs=("numbers",), fn="toy_stages:broken")]
