"""The table at the end of benchmarks/gpu_campaign.sh: every figure of OUTDIR against its goal.

    python benchmarks/campaign_table.py OUTDIR

Reads OUTDIR/campaign.log, kernels.log, train.jsonl and decode.jsonl (what the campaign's
parts wrote; a part that failed or ran out of time shows as missing figures) and prints Markdown:
the parts, the goals (met / NOT met / unmeasured), the training step per shape and model, and the
decode rows, each with its ratios. Standard library only.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

# Issue 21's goals for xlstm_large_400m on one H100, by sequence length of the B x S training step:
# tokens/s at least, and its ratio to the Llama baseline (llama_400m, same run) at least.
TRAIN_GOALS = {2048: (100_000, 1.0), 8192: (110_000, 1.35)}
PEAK_GIB_GOAL = 34.0
DECODE_GOAL = 1_800.0  # batch-1 tokens/s


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def fmt(x: Optional[float], spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def verdict(value: Optional[float], goal: float, at_most: bool = False) -> str:
    if value is None:
        return "unmeasured"
    return "met" if (value <= goal if at_most else value >= goal) else "NOT met"


def kernel_check(outdir: Path) -> tuple[str, str]:
    log = outdir / "kernels.log"
    if not log.is_file():
        return "-", "unmeasured"
    text = log.read_text()
    ok, bad = len(re.findall(r"^\s+\[ok\]", text, re.M)), len(re.findall(r"^\s+\[FAIL\]", text, re.M))
    done = "ALL OK" in text or (ok and not bad and "Traceback" not in text)
    return f"{ok} ok, {bad} FAIL", ("met" if done and not bad else ("NOT met" if ok or bad else "unmeasured"))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    outdir = Path(argv[0])
    print("# GPU campaign")
    log = outdir / "campaign.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    header = [line for line in lines if not line.startswith("part\t")]
    if header:
        print("\n```\n" + "\n".join(header).strip() + "\n```")

    print("\n## Parts\n\n| part | exit | seconds |\n|---|---|---|")
    for line in lines:
        if not line.startswith("part\t"):
            continue
        name, rc, secs = (line.split("\t")[1:] + ["", ""])[:3]
        note = {"124": " (timed out)", "137": " (killed)", "skipped": " (no time left)"}.get(rc, "")
        print(f"| {name} | {rc}{note} | {secs} |")

    train = [r for r in read_jsonl(outdir / "train.jsonl")]
    ok = [r for r in train if "error" not in r]
    decode = read_jsonl(outdir / "decode.jsonl")
    decode_ok = [r for r in decode if "error" not in r]
    subject = next((r["model"] for r in ok if r.get("arch") != "llama"), None)
    baseline = next((r["model"] for r in ok if r.get("arch") == "llama"), None)
    shapes = sorted({(r["batch"], r["seq_len"]) for r in train}, key=lambda s: s[1])

    def best(model: Optional[str], shape: tuple[int, int]) -> Optional[dict]:
        rows = [r for r in ok if r["model"] == model and (r["batch"], r["seq_len"]) == shape]
        return max(rows, key=lambda r: r["tokens_per_s"], default=None)

    def row(model: Optional[str], mode: str, shape: tuple[int, int]) -> Optional[dict]:
        return next((r for r in train if r["model"] == model and r["mode"] == mode
                     and (r["batch"], r["seq_len"]) == shape), None)

    print("\n## Goals\n\n| goal | measured | target | |\n|---|---|---|---|")
    measured, state = kernel_check(outdir)
    print(f"| Triton kernels vs the float64 reference | {measured} | all ok | {state} |")
    for shape in shapes:
        b, s = shape
        tokens_goal, ratio_goal = TRAIN_GOALS.get(s, (None, None))
        mine, theirs = best(subject, shape), best(baseline, shape)
        tps = mine["tokens_per_s"] if mine else None
        how = f" ({mine['mode']})" if mine else ""
        if tokens_goal:
            print(f"| {subject} train tok/s, B{b}xS{s}{how} | {fmt(tps)} | >= {tokens_goal:,} | {verdict(tps, tokens_goal)} |")
        else:
            print(f"| {subject} train tok/s, B{b}xS{s}{how} | {fmt(tps)} | (no goal at this shape) | |")
        ratio = mine["tokens_per_s"] / theirs["tokens_per_s"] if mine and theirs else None
        target = f">= {ratio_goal:.2f}x" if ratio_goal else "(no goal at this shape)"
        print(f"| {subject} / {baseline} tok/s (best of each), B{b}xS{s} | {fmt(ratio, '.2f', 'x')} | {target} | "
              f"{verdict(ratio, ratio_goal) if ratio_goal else ''} |")
        peak = mine["peak_gib"] if mine else None
        print(f"| {subject} peak memory, B{b}xS{s}{how} | {fmt(peak, '.1f', ' GiB')} | <= {PEAK_GIB_GOAL:.0f} GiB | "
              f"{verdict(peak, PEAK_GIB_GOAL, at_most=True)} |")
    best_decode = max(decode_ok, key=lambda r: r["tokens_per_s"], default=None)
    dtps = best_decode["tokens_per_s"] if best_decode else None
    which = f" ({best_decode['variant']}, {best_decode['ctx']} context)" if best_decode else ""
    print(f"| batch-1 decode tok/s, best{which} | {fmt(dtps)} | >= {DECODE_GOAL:,.0f} | {verdict(dtps, DECODE_GOAL)} |")

    if train:
        print("\n## Training step (forward, backward, fused AdamW; bf16 autocast)\n")
        print("| shape | model | mode | tok/s | ms/step | MFU | peak GiB | set-up s | compiled/eager | vs baseline |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            for model in dict.fromkeys(r["model"] for r in train):
                for mode in ("eager", "compiled"):
                    r = row(model, mode, shape)
                    if r is None:
                        continue
                    if "error" in r:
                        print(f"| B{shape[0]}xS{shape[1]} | {model} | {mode} | FAILED: {r['error'][:80]} | | | | | | |")
                        continue
                    eager = row(model, "eager", shape)
                    speedup = (r["tokens_per_s"] / eager["tokens_per_s"]
                               if mode == "compiled" and eager and "error" not in eager else None)
                    base = row(baseline, mode, shape)
                    vs = (r["tokens_per_s"] / base["tokens_per_s"]
                          if model != baseline and base and "error" not in base else None)
                    mfu = fmt(100 * r["mfu"], ".1f", "%") if r.get("mfu") is not None else "-"
                    print(f"| B{shape[0]}xS{shape[1]} | {model} | {mode} | {r['tokens_per_s']:,.0f} | "
                          f"{r['ms_per_step']:.1f} | {mfu} | {r['peak_gib']:.1f} | {r['setup_s']:.0f} | "
                          f"{fmt(speedup, '.2f', 'x')} | {fmt(vs, '.2f', 'x')} |")

    if decode:
        print("\n## Batch-1 decode (tokens/s; each ending in a host sync)\n")
        variants = list(dict.fromkeys(r["variant"] for r in decode))
        contexts = sorted({r["ctx"] for r in decode_ok})
        by = {(r["variant"], r["ctx"]): r for r in decode_ok}
        print("| variant | " + " | ".join(f"{c:,} context" for c in contexts) + " | vs compiled |")
        print("|---" * (len(contexts) + 2) + "|")
        for v in variants:
            if any(r["variant"] == v and "error" in r for r in decode):
                print(f"| {v} | FAILED to set up |" + " |" * len(contexts))
                continue
            cells = [fmt(by[v, c]["tokens_per_s"]) if (v, c) in by else "-" for c in contexts]
            ratios = [by[v, c]["tokens_per_s"] / by["compiled", c]["tokens_per_s"]
                      for c in contexts if (v, c) in by and ("compiled", c) in by]
            vs = " / ".join(f"{x:.2f}x" for x in ratios) if ratios and v != "compiled" else "-"
            name = "fused" if v == "base" else v
            print(f"| {name} | " + " | ".join(cells) + f" | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
