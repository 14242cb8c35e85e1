"""Small real stages for the runner's tests: they read config keys, write files, and count their runs.

Importable by Ray workers because the tests put this folder on PYTHONPATH before Ray starts.
"""
from __future__ import annotations

import json
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
    until = time.time() + float(os.environ.get("XLP_TEST_TOY_SLEEP", "0"))
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


def _far_work(started: str, hold: str) -> str:
    import ray

    node = ray.get_runtime_context().get_node_id()
    with open(started, "w") as f:
        f.write(f"{os.getpid()} {node}")
    until = time.time() + 120
    while os.path.exists(hold) and time.time() < until:
        time.sleep(0.1)
    return node


def far(ctx: StageContext) -> dict:
    """A stage whose work runs in a Ray task on another node than the stage's own when the cluster has
    one, as the data stages' tasks do. While RUN_DIR/hold exists, the task waits (up to 120 s: for a
    test to take its node, or the stage's process, away); RUN_DIR/far/stage_pid names the stage's process."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _count_call(ctx)
    (ctx.out_dir / "stage_pid").write_text(str(os.getpid()))
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    work = ray.remote(num_cpus=0, max_retries=0)(_far_work)
    if others:
        work = work.options(scheduling_strategy=NodeAffinitySchedulingStrategy(others[0], soft=False))
    node = ray.get(work.remote(str(ctx.out_dir / "started"), str(ctx.run_dir / "hold")))
    atomic_write_text(ctx.out_dir / "far.txt", node)
    return {"far_node": node}


TOY_STAGES = [
    Stage("numbers", reads=("data.seq_len",), needs=(), fn="toy_stages:numbers", headline=("count",)),
    Stage("total", reads=("train.steps",), needs=("numbers",), fn="toy_stages:total"),
    Stage("report", reads=(), needs=("total",), fn="toy_stages:report"),
]
UNDECLARED_STAGES = [Stage("undeclared", reads=("train.steps",), needs=(), fn="toy_stages:undeclared")]
BROKEN_STAGES = TOY_STAGES[:1] + [Stage("broken", reads=(), needs=("numbers",), fn="toy_stages:broken")]
FAR_STAGES = TOY_STAGES[:1] + [Stage("far", reads=(), needs=("numbers",), fn="toy_stages:far")]


# What env_probe reports: a variable `xlp run` passes to its stage tasks on a Ray it did not start, a
# secret one (by its name's suffix), and one it does not pass.
PROBED = ("XLP_TEST_PLAIN", "XLP_TEST_PROBE_KEY", "NOT_PASSED_PROBE")


def env_probe(ctx: StageContext) -> dict:
    """Writes which of PROBED the stage's task sees, and their values, to env.json."""
    seen = {name: os.environ.get(name) for name in PROBED}
    atomic_write_text(ctx.out_dir / "env.json", json.dumps(seen))
    return {"seen": sum(v is not None for v in seen.values())}
