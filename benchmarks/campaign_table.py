"""The table at the end of benchmarks/gpu_campaign.sh: every figure of OUTDIR against its goal.

    python benchmarks/campaign_table.py OUTDIR

Reads OUTDIR/campaign.log, kernels.log and results.jsonl (what the campaign's parts wrote, each row's
"bench" saying whose: pipeline, train_step, peer, decode, seqpar; a part that failed or ran out of time
shows as missing figures) and prints Markdown: the parts, the goals (met / NOT met / unmeasured), the
pipeline run, the training step per shape and model, the peers (our/peer ratios, or "peer not installed"),
the decode rows, each with its ratios, and sequence parallelism on 2 GPUs (or why it is unmeasured).
Standard library only.
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
# Issue 31: peak activation memory per rank with train.sequence_parallel=2, over that of one rank, at most
SEQPAR_MEMORY_GOAL = 0.6


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


def bench_of(row: dict[str, Any]) -> str:
    """Whose row: its "bench", else (files of campaigns before results.jsonl) what its keys say."""
    if "bench" in row:
        return str(row["bench"])
    return "decode" if "variant" in row else "train_step"


def pipeline_verdict(rec: Optional[dict]) -> tuple[str, str]:
    if rec is None:
        return "-", "unmeasured"
    if rec.get("ok"):
        return f"every stage done; resumed at step {rec.get('resumed_from_step')}, bitwise equal", "met"
    return "FAILED: " + "; ".join(rec.get("failed") or ["?"])[:200], "NOT met"


def backends_text(backends: Optional[dict]) -> str:
    """{device: {op: [backends]}} as `cuda: 5 ops triton` / `cuda: rms_norm FELL BACK`."""
    if not backends:
        return "-"
    parts = []
    for device, ops in sorted(backends.items()):
        by: dict[str, list[str]] = {}
        for op, used in sorted(ops.items()):
            by.setdefault("+".join(used), []).append(op)
        parts.append(f"{device}: " + ", ".join(
            f"{len(v)} ops {k}" if k != "fallback" else f"{', '.join(v)} FELL BACK to the reference" for k, v in by.items()))
    return "; ".join(parts)


def print_pipeline(rec: dict) -> None:
    print("\n## Pipeline (`xlp run campaign_gpu`, every stage, then a SIGTERM and a resume)\n")
    stages = rec.get("stages") or {}
    print("| " + " | ".join(f"{k} s" for k in stages) + " | train tok/s | MFU | peak GiB | val loss | val bpb | "
          "SIGTERM at step | resumed from | bitwise |")
    print("|---" * (len(stages) + 8) + "|")
    bw = rec.get("bitwise") or {}
    same = "-" if not bw else ("yes" if bw.get("losses_equal") and bw.get("weights_equal") else
                               f"NO ({bw.get('diff') or 'model files differ'})")
    mfu = rec.get("mfu")
    print("| " + " | ".join(fmt(v, ".1f") for v in stages.values()) + f" | {fmt(rec.get('tokens_per_s'))} | "
          f"{fmt(100 * mfu if mfu is not None else None, '.1f', '%')} | {fmt(rec.get('peak_gib'), '.1f')} | "
          f"{fmt(rec.get('val_loss'), '.3f')} | {fmt(rec.get('val_bpb'), '.3f')} | {rec.get('sigterm_at_step', '-')} | "
          f"{rec.get('resumed_from_step', '-')} | {same} |")
    kb = rec.get("kernel_backends") or {}
    print(f"\nKernels the stages ran: train {backends_text(kb.get('train'))}; eval {backends_text(kb.get('eval'))}.")
    for line in rec.get("failed") or []:
        print(f"\n- FAILED: {line}")


def seqpar_verdict(rows: list[dict]) -> tuple[str, str, str]:
    """(what, measured, verdict) of the sequence-parallel memory goal: the sp=2 / sp=1 peak activation
    memory per rank at the longest S measured with both; or why it is unmeasured."""
    skipped = next((r["status"] for r in rows if r.get("status", "ok") != "ok"), None)
    ok = {(r["S"], r["sp"]): r for r in rows if r.get("status", "ok") == "ok"}
    both = sorted(S for S, sp in ok if sp == 2 and (S, 1) in ok and ok[S, 1]["peak_mib"] > 0)
    if not both:
        return "", skipped or "-", "unmeasured"
    S = both[-1]
    ratio = ok[S, 2]["peak_mib"] / ok[S, 1]["peak_mib"]
    return f", S={S:,}", f"{ratio:.2f}x", verdict(ratio, SEQPAR_MEMORY_GOAL, at_most=True)


def print_seqpar(rows: list[dict]) -> None:
    print("\n## Sequence parallelism (one row over the ranks of a group; fp32, Triton, NCCL)\n")
    print("| S | sequence_parallel | peak activation MiB a rank | vs sp=1 | sent KiB a rank a step | tokens/s |")
    print("|---|---|---|---|---|---|")
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    for r in ok:
        one = next((o for o in ok if o["S"] == r["S"] and o["sp"] == 1), None)
        vs = r["peak_mib"] / one["peak_mib"] if one and r["sp"] != 1 and one["peak_mib"] > 0 else None
        print(f"| {r['S']:,} | {r['sp']} | {r['peak_mib']:,.1f} | {fmt(vs, '.2f', 'x')} | {r['sent_kib']:,.1f} | "
              f"{r['tokens_per_s']:,.0f} |")


def print_peers(rows: list[dict]) -> None:
    print("\n## Peers (the official code beside ours, one process, one GPU)\n")
    print("| peer | what | shape | ours | peer | ours/peer |\n|---|---|---|---|---|---|")
    for r in rows:
        status = r.get("status")
        if status == "not installed":
            print(f"| {r['peer']} | peer not installed | | | | |")
        elif status != "ok":
            print(f"| {r['peer']} | {r.get('what', '')} {r.get('kernel') or r.get('mode') or ''} | | {status}: "
                  f"{(r.get('error') or '')[:80]} | | |")
        elif "ours_ms" in r:
            print(f"| {r['peer']} | {r['what']}, {r['kernel']} | B{r['batch']}xS{r['seq_len']} | {r['ours_ms']:.2f} ms | "
                  f"{r['peer_ms']:.2f} ms | {r['ours_over_peer']:.2f}x |")
        else:
            print(f"| {r['peer']} | {r['what']}, ours {r['mode']} | B{r['batch']}xS{r['seq_len']} | "
                  f"{r['ours_tokens_per_s']:,.0f} tok/s, {r['ours_peak_gib']:.1f} GiB | {r['peer_tokens_per_s']:,.0f} tok/s, "
                  f"{r['peer_peak_gib']:.1f} GiB | {r['ours_over_peer']:.2f}x |")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    outdir = Path(argv[0])
    print("# GPU campaign")
    log = outdir / "campaign.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    # the lines before the first part's (a part may append its output after them: seqpar)
    first = next((n for n, line in enumerate(lines) if line.startswith("part\t")), len(lines))
    header = lines[:first]
    if header:
        print("\n```\n" + "\n".join(header).strip() + "\n```")

    print("\n## Parts\n\n| part | exit | seconds |\n|---|---|---|")
    for line in lines:
        if not line.startswith("part\t"):
            continue
        name, rc, secs = (line.split("\t")[1:] + ["", ""])[:3]
        note = {"124": " (timed out)", "137": " (killed)", "skipped": " (no time left)"}.get(rc, "")
        print(f"| {name} | {rc}{note} | {secs} |")

    rows = read_jsonl(outdir / "results.jsonl") + read_jsonl(outdir / "train.jsonl") + read_jsonl(outdir / "decode.jsonl")
    train = [r for r in rows if bench_of(r) == "train_step"]
    ok = [r for r in train if "error" not in r]
    decode = [r for r in rows if bench_of(r) == "decode"]
    peers = [r for r in rows if bench_of(r) == "peer"]
    pipeline = next((r for r in reversed(rows) if bench_of(r) == "pipeline"), None)
    seqpar = [r for r in rows if bench_of(r) == "seqpar"]
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
    measured, state = pipeline_verdict(pipeline)
    print(f"| the pipeline on this GPU: every stage, exact resume after SIGTERM, no reference ops on CUDA | {measured} "
          f"| all | {state} |")
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
    where, measured, state = seqpar_verdict(seqpar)
    print(f"| sequence_parallel=2 on 2 GPUs: peak activation memory a rank / sequence_parallel=1{where} | {measured} | "
          f"<= {SEQPAR_MEMORY_GOAL:.2f}x | {state} |")

    if pipeline is not None:
        print_pipeline(pipeline)

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

    if peers:
        print_peers(peers)

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

    if any(r.get("status", "ok") == "ok" for r in seqpar):
        print_seqpar(seqpar)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
