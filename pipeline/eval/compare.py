"""`xlp compare RUN_A RUN_B ...`: the eval stage's headline numbers of several runs side by side
(e.g. xLSTM vs the Llama baseline trained on the same shards).

Reads RUN_DIR/eval/metrics.json (written by the eval stage) and a few facts from
RUN_DIR/eval/results.json (architecture, parameters, training tokens). Lower is better for
losses, bpb and memory; higher for accuracies and tokens/s. The eval stage's status comes first: a
column whose eval is not done with the run's config (failed, stale, running, or never marked) is
starred and a note under the table says what its numbers are.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from xlp.pipeline.core.config import ConfigError, load_run_config
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.core.registry import EVAL, STAGES
from xlp.pipeline.core.stage import fingerprints, marker_status, read_marker

INFO_ROWS = (("arch", "arch"), ("params (M)", "params"), ("train steps", "train_steps"),
             ("tokens seen", "tokens_seen"), ("seq len", "seq_len"), ("device", "device"))
# shown first, in this order; every other headline key follows, sorted
FIRST = ("val_loss", "val_ppl", "val_bpb", "untrained_bpb", "bytes_per_token", "loss_1x", "loss_2x", "loss_4x",
         "loss_8x", "loss_beyond_train_len", "recall_acc")


def _load(run_dir: Path) -> tuple[dict, dict]:
    layout = RunLayout(run_dir)
    metrics_file = layout.eval_metrics
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no eval/metrics.json (run the eval stage: xlp run CONFIG --stages eval)")
    try:
        metrics = json.loads(metrics_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{metrics_file} is damaged ({e}): evaluate the run again "
                         "(xlp run CONFIG --stages eval --force)") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{metrics_file} is damaged (a JSON {type(metrics).__name__}, not an object): evaluate "
                         "the run again (xlp run CONFIG --stages eval --force)")
    info = {}
    try:
        info = json.loads(layout.eval_results.read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):  # results.json gives only the info rows
        pass
    return metrics, info


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _order(keys: set[str]) -> list[str]:
    def gen_key(k: str):  # gen_<ctx>_<what>: by what, then context
        parts = k.split("_")
        try:
            return ("_".join(parts[2:]), int(parts[1]))
        except (IndexError, ValueError):
            return (k, 0)

    first = [k for k in FIRST if k in keys]
    gen = sorted((k for k in keys if k.startswith("gen_") and k not in first), key=gen_key)
    rest = sorted(k for k in keys if k not in first and k not in gen)
    return first + [k for k in rest if not k.startswith(("xlp_", "recall_acc_"))] + \
        sorted((k for k in rest if k.startswith("recall_acc_")), key=lambda k: int(k.rsplit("_", 1)[1])) + gen + [k for k in rest if k.startswith("xlp_")]


def eval_status(run_dir: Path) -> tuple[str, str]:
    """The eval stage's status in `run_dir` (done | stale | running | failed | pending, as `xlp status`
    says) and, when it is not done, a note on what its numbers are."""
    layout = RunLayout(run_dir)
    marker = read_marker(EVAL, layout.eval_dir)
    unchecked = ""
    try:
        fp = fingerprints(STAGES, load_run_config(layout.config))[EVAL.name]
    except (ConfigError, OSError, ValueError) as e:  # a damaged config.yaml, a corpus no longer there
        fp = marker.get("fingerprint", "")
        unchecked = f" (not checked against the run's config: {str(e).splitlines()[0]})"
    status = marker_status(marker, fp, run_dir)
    if status == "done":
        return status, ""
    cmd = f"`xlp run CONFIG --run-dir {run_dir} --stages eval` evaluates it again"
    error = (marker.get("damaged") or marker.get("error") or "no error recorded").strip().splitlines()[-1]
    notes = {
        "stale": (f"its eval is stale: it finished with another config than {layout.config.name} says now "
                  f"(fingerprint {marker.get('fingerprint')}, now {fp}): the numbers are of the run before that "
                  f"change; {cmd}"),
        "running": "its eval is still running: the numbers are of an earlier attempt, or partial",
        "failed": f"its eval failed ({error}): the numbers are what it left, not a finished evaluation; {cmd}",
        "pending": f"its eval stage has no stage.json: the numbers were not written by a finished eval stage; {cmd}",
    }
    return status, notes[status] + unchecked


def compare_table(run_dirs: list[str]) -> list[list[str]]:
    return compare(run_dirs)[0]


def compare(run_dirs: list[str]) -> tuple[list[list[str]], list[str]]:
    """The table's rows and the notes under it (one per run whose eval is not done)."""
    cols, notes = [], []
    for rd in run_dirs:
        metrics, info = _load(Path(rd))
        status, note = eval_status(Path(rd))
        name = Path(rd).name or str(rd)
        if status != "done":
            name += "*"
            notes.append(f"* {name[:-1]}: {note}")
        cols.append((name, metrics, info, status))
    rows = [["metric"] + [c[0] for c in cols]]
    rows.append(["eval stage"] + [c[3] if c[3] == "done" else c[3].upper() for c in cols])
    for label, key in INFO_ROWS:
        vals = [c[2].get(key) for c in cols]
        if key == "params":
            vals = [v / 1e6 if isinstance(v, (int, float)) else v for v in vals]
        rows.append([label] + [_fmt(v) for v in vals])
    keys = set().union(*(c[1].keys() for c in cols))
    for k in _order(keys):
        rows.append([k] + [_fmt(c[1].get(k)) for c in cols])
    return rows, notes


def main(run_dirs: list[str], out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    if not run_dirs:
        print("xlp compare: give one or more run directories", file=sys.stderr)
        return 2
    try:
        rows, notes = compare(run_dirs)
    except (FileNotFoundError, ValueError) as e:
        print(f"xlp compare: error: {e}", file=sys.stderr)
        return 1
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    for note in notes:
        print(note, file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
