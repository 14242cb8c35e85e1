"""RUN_DIR/eval/report.md with PNG plots, and the same plots and numbers logged to W&B.

Plots (matplotlib, Agg backend, written next to report.md):
- train_loss.png: training loss (and validation loss) per step from RUN_DIR/train/metrics.jsonl,
  with the eval stage's held-out loss of the trained and of the untrained model;
- loss_vs_context.png: loss by position bucket at 1x..8x the training length;
- memory_vs_context.png: decode peak memory, state size and decode tokens/s vs prompt length;
- recall.png: associative recall accuracy by number of pairs (with chance) and by distance.

W&B: a run of its own (job_type "eval", in the group of the training run: wandb.group or run.name),
written under RUN_DIR/eval/wandb in wandb.mode (offline by default; `wandb sync` uploads it). A
separate run, because the training run is finished and offline runs cannot be resumed reliably.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from xlp.pipeline.core.diskfull import writing
from xlp.pipeline.core.stage import atomic_write_text

PLOTS = ("train_loss.png", "loss_vs_context.png", "memory_vs_context.png", "recall.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_axes(ax, xlabel: str, ylabel: str, title: str, *, title_size: Optional[float] = None,
               legend_size: float = 8, legend_cols: int = 1) -> None:
    """The labels, title, grid and legend every single-axes plot of the reports has."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({"fontsize": title_size} if title_size else {}))  # else the axes' title size
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=legend_cols)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close the figure (an open one keeps its memory for the process's life)."""
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path)
    finally:
        _plt().close(fig)
    return path


def plot_train_loss(metrics: dict[int, dict], results: dict, path: Path) -> Optional[Path]:
    steps = sorted(s for s, r in metrics.items() if r.get("train/loss") is not None)
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, [metrics[s]["train/loss"] for s in steps], lw=1.2, label="train loss")
    vsteps = sorted(s for s, r in metrics.items() if r.get("val/loss") is not None)
    if vsteps:
        ax.plot(vsteps, [metrics[s]["val/loss"] for s in vsteps], "o-", ms=4, label="val loss (train stage)")
    ppl = results.get("ppl") or {}
    for key, style, label in (("trained", "g--", "eval: trained"), ("untrained", "r:", "eval: untrained (same init)")):
        loss = (ppl.get(key) or {}).get("loss")
        if loss is not None:
            ax.axhline(loss, color=style[0], ls=style[1:], lw=1.2, label=f"{label} {loss:.3f}")
    label_axes(ax, "step", "loss (nats / token)", "Training loss")
    return save_figure(fig, path)


def plot_long_context(lc: dict, path: Path) -> Optional[Path]:
    rows = [r for r in lc.get("results", []) if not r.get("skipped")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in rows:
        pts = [(max(1.0, (b["lo"] + b["hi"]) / 2), b["loss"]) for b in r["buckets"] if b["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=f"{r['multiplier']}x ({r['seq_len']} tokens), mean {r['loss']:.3f}")
    ax.axvline(lc["train_len"], color="k", ls="--", lw=1, label=f"training length {lc['train_len']}")
    ax.set_xscale("log", base=2)
    label_axes(ax, "position (tokens of context)", "loss (nats / token)", "Loss by position at 1x..8x the training length")
    return save_figure(fig, path)


def plot_generation(gen: dict, arch: str, path: Path) -> Optional[Path]:
    rows = gen.get("results") or []
    if not rows:
        return None
    plt = _plt()
    ctx = [r["context"] for r in rows]
    mib = 2.0 ** 20
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    a1.plot(ctx, [r["decode_peak_bytes"] / mib for r in rows], "o-", label="decode peak memory")
    a1.plot(ctx, [r["prefill_peak_bytes"] / mib for r in rows], "s--", label="prefill peak memory")
    a1.plot(ctx, [r["state_bytes"] / mib for r in rows], "^-", label="state / KV cache")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("prompt length (tokens)")
    a1.set_ylabel("MiB")
    a1.set_title(f"Memory at batch 1 ({gen.get('device')}, {gen.get('memory_source')})", fontsize=9)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    decode_speed_errorbar(a2, rows, color="tab:green")
    a2.set_xscale("log", base=2)
    a2.set_ylim(bottom=0)
    a2.set_xlabel("prompt length (tokens)")
    a2.set_ylabel("decode tokens / s")
    a2.set_title(f"Decode speed at batch 1 (median of {gen.get('repeats', 1)} rounds, bars: fastest-slowest)",
                 fontsize=9)
    a2.grid(alpha=0.3)
    fig.suptitle(f"Generation cost vs context ({arch})")
    return save_figure(fig, path)


def decode_speed_errorbar(ax, rows: list[dict], fmt: str = "o-", **kw) -> None:
    """Decode tokens/s against context: the median, and a bar from the slowest to the fastest round
    (rows measured before the rounds existed have no spread)."""
    ctx = [r["context"] for r in rows]
    mid = [r["decode_tokens_per_s"] for r in rows]
    lo = [mid[i] - r.get("decode_tokens_per_s_min", mid[i]) for i, r in enumerate(rows)]
    hi = [r.get("decode_tokens_per_s_max", mid[i]) - mid[i] for i, r in enumerate(rows)]
    ax.errorbar(ctx, mid, yerr=[lo, hi], fmt=fmt, capsize=3, **kw)


def plot_recall(rec: dict, path: Path) -> Optional[Path]:
    rows = [r for r in rec.get("results", []) if not r.get("skipped")]
    if not rows:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    labels = [str(r["pairs"]) for r in rows]
    xs = range(len(rows))
    a1.bar([x - 0.2 for x in xs], [r["acc"] for r in rows], width=0.4, label="model")
    a1.bar([x + 0.2 for x in xs], [r["chance"] for r in rows], width=0.4, color="gray", label="chance (1/pairs)")
    a1.set_xticks(list(xs), labels)
    a1.set_xlabel("key-value pairs in the prompt")
    a1.set_ylabel("accuracy")
    a1.set_ylim(0, 1)
    a1.set_title("Recall accuracy by pairs", fontsize=9)
    a1.legend(fontsize=8)
    for r in rows:
        pts = [(max(1, (b["lo"] + b["hi"]) / 2), b["acc"]) for b in r["by_distance"] if b["acc"] is not None]
        if pts:
            a2.plot(*zip(*pts), "o-", ms=3, label=f"{r['pairs']} pairs")
    a2.set_xscale("log", base=2)
    a2.set_ylim(0, 1)
    a2.set_xlabel("distance from query to its pair (tokens)")
    a2.set_ylabel("accuracy")
    a2.set_title("Recall accuracy by distance", fontsize=9)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle("MQAR-style associative recall (zero-shot)")
    return save_figure(fig, path)


def make_plots(out_dir: Path, results: dict, train_metrics: dict[int, dict], arch: str) -> list[Path]:
    made = [
        plot_train_loss(train_metrics, results, out_dir / PLOTS[0]),
        plot_long_context(results.get("long_context") or {}, out_dir / PLOTS[1]),
        plot_generation(results.get("generation") or {}, arch, out_dir / PLOTS[2]),
        plot_recall(results.get("recall") or {}, out_dir / PLOTS[3]),
    ]
    return [p for p in made if p is not None]


# ------------------------------------------------------------------------------------------ markdown


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1e5:
            return f"{x:.4g}"
        return f"{x:.{nd}f}" if abs(x) < 10 else f"{x:,.1f}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(path: Path, results: dict, plots: list[Path]) -> Path:
    """The markdown report at `path` (RUN_DIR/eval/report.md), linking the plots beside it."""
    info = results.get("info", {})
    md = [f"# Evaluation report: {info.get('run_name', '?')}\n",
          f"Model: `{info.get('arch')}`, {info.get('params', 0) / 1e6:.2f}M parameters, vocabulary "
          f"{info.get('vocab_size')} (tokenizer {info.get('tokenizer_vocab')}), trained {info.get('train_steps') or '?'} steps on "
          f"{info.get('tokens_seen') or 0:,} tokens at sequence length {info.get('seq_len')}. "
          f"Evaluated on {info.get('device')} at {time.strftime('%Y-%m-%d %H:%M', time.localtime(info.get('time', time.time())))} "
          f"in {info.get('seconds', 0):.0f} s.\n"]
    names = {p.name for p in plots}

    ppl = results.get("ppl")
    if ppl and not ppl.get("skipped"):
        md.append("## Held-out perplexity and bits per byte\n")
        md.append(f"Val split, {ppl['batches']} batches of {ppl['rows'] // max(1, ppl['batches'])} x {ppl['seq_len']} tokens "
                  f"({ppl['trained']['tokens']:,} tokens, {ppl['trained']['bytes']:,} bytes, "
                  f"{_f(ppl.get('bytes_per_token'), 3)} bytes/token). Bits per byte = NLL / ln 2 / UTF-8 bytes of the "
                  "predicted text (tokenizer-independent).\n")
        rows = []
        for key in ("trained", "untrained"):
            if key in ppl:
                r = ppl[key]
                rows.append([key, r["loss"], r["ppl"], r["bits_per_token"], r["bpb"]])
        if ppl.get("uniform_bpb") is not None:
            rows.append(["uniform over the vocabulary", ppl["uniform_loss"], math.exp(ppl["uniform_loss"]),
                         ppl["uniform_loss"] / math.log(2), ppl["uniform_bpb"]])
        md.append(_table(["model", "loss (nats/token)", "perplexity", "bits/token", "bits/byte"], rows))
        if "untrained" in ppl and ppl["untrained"]["bpb"] and ppl["trained"]["bpb"]:
            md.append(f"\nThe trained model is {ppl['untrained']['bpb'] - ppl['trained']['bpb']:.3f} bits per byte "
                      f"({100 * (1 - ppl['trained']['bpb'] / ppl['untrained']['bpb']):.0f}%) below the untrained one.\n")
        md.append("")
    if "train_loss.png" in names:
        md.append("![training loss](train_loss.png)\n")

    lc = results.get("long_context")
    if lc:
        md.append("## Long context: loss by position\n")
        md.append(f"Rows of m x {lc['train_len']} tokens (the training length) from the val split; position = tokens of "
                  "context the prediction had (from the row's or the document's start). Loss beyond the training length "
                  "staying level means the model extrapolates.\n")
        rows = []
        for r in lc["results"]:
            if r.get("skipped"):
                rows.append([f"{r['multiplier']}x", r["seq_len"], "-", "-", "-", r["skipped"]])
                continue
            rows.append([f"{r['multiplier']}x", r["seq_len"], r["rows"], r["loss"], r["loss_beyond_train_len"],
                         f"{r['tokens_beyond_train_len']:,} tokens beyond"])
        md.append(_table(["length", "tokens/row", "rows", "mean loss", f"loss at positions >= {lc['train_len']}", "note"], rows))
        big = next((r for r in reversed(lc["results"]) if not r.get("skipped")), None)
        if big:
            md.append(f"\nBy position ({big['multiplier']}x):\n")
            md.append(_table(["positions", "tokens", "loss"],
                             [[f"{b['lo']}-{b['hi'] - 1}", b["tokens"], b["loss"]] for b in big["buckets"]]))
        md.append("")
    if "loss_vs_context.png" in names:
        md.append("![loss vs context](loss_vs_context.png)\n")

    gen = results.get("generation")
    if gen:
        md.append("## Generation cost (batch 1)\n")
        md.append(f"Device {gen['device']}; prompt read in chunks of {gen['prefill_chunk']} tokens (logits of the last "
                  f"position only), then {gen.get('repeats', 1)} rounds of {gen['gen_tokens']} timed greedy decode steps per "
                  "context, the contexts interleaved: decode speed is the median round, with the slowest and fastest "
                  "round beside it (a difference smaller than that spread is noise). Weights "
                  f"{gen['weight_bytes'] / 2**20:.1f} MiB; peak memory from {gen['memory_source']}.\n")
        mib = 2.0 ** 20
        md.append(_table(["prompt tokens", "prefill tok/s", "decode tok/s", "slowest-fastest round", "ms/token",
                          "state MiB", "prefill peak MiB", "decode peak MiB"],
                         [[r["context"], r["prefill_tokens_per_s"], r["decode_tokens_per_s"],
                           f"{r.get('decode_tokens_per_s_min', '-')}-{r.get('decode_tokens_per_s_max', '-')}",
                           r["decode_ms_per_token"], r["state_bytes"] / mib, r["prefill_peak_bytes"] / mib,
                           r["decode_peak_bytes"] / mib]
                          for r in gen["results"]]))
        md.append("")
    if "memory_vs_context.png" in names:
        md.append("![memory vs context](memory_vs_context.png)\n")

    rec = results.get("recall")
    if rec:
        md.append("## Associative recall (MQAR-style, zero-shot)\n")
        md.append("Random key-value token pairs, then queries of keys; accuracy = the right value scores highest among the "
                  "prompt's values (chance 1/pairs); vocab acc = it is the argmax over the whole vocabulary.\n")
        rows = []
        for r in rec["results"]:
            if r.get("skipped"):
                rows.append([r["pairs"], "-", "-", "-", "-", r["skipped"]])
            else:
                rows.append([r["pairs"], r["trials"] * r["queries_per_seq"], r["acc"], r["chance"], r["acc_vocab"],
                             (f"untrained {r['untrained_acc']:.3f}" if r.get("untrained_acc") is not None else "")])
        md.append(_table(["pairs", "queries", "acc", "chance", "vocab acc", "note"], rows))
        md.append("")
    if "recall.png" in names:
        md.append("![recall](recall.png)\n")

    lm = results.get("lm_eval")
    if lm:
        md.append("## lm-evaluation-harness\n")
        if lm.get("error"):
            md.append(f"Failed: `{lm['error']}`\n")
        else:
            md.append(f"Tasks {', '.join(lm['tasks'])}; limit {lm.get('limit') or 'none'} documents per task; "
                      f"max context {lm.get('max_length')} tokens; {lm.get('seconds', 0):.0f} s.\n")
            rows = []
            for task, metrics in lm["results"].items():
                for name, value in metrics.items():
                    if "stderr" in name or name == "n":
                        continue
                    rows.append([task, name, value, metrics.get(f"{name}_stderr")])
            md.append(_table(["task", "metric", "value", "stderr"], rows))
            md.append("\nstderr: binomial standard error of 0/1 metrics over the documents scored.\n")
        md.append("")

    with writing(path):
        atomic_write_text(path, "\n".join(md))
    return path


# ------------------------------------------------------------------------------------------ W&B


def log_wandb(out_dir: Path, cfg, headline: dict, results: dict, plots: list[Path]) -> Optional[str]:
    """Log the headline numbers, tables and plots to a W&B eval run; returns its id (None: off)."""
    mode = str(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    run_name = str(cfg.run.name)
    run = wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or run_name,
        tags=list(cfg.wandb.tags or []) + ["eval"], name=f"{cfg.wandb.name or run_name}-eval", job_type="eval",
        config={"eval": dict(results.get("config", {})), "run": run_name}, mode=mode, dir=str(out_dir),
        settings=wandb.Settings(console="off", silent=True), reinit="finish_previous",
    )
    try:
        run.log({f"eval/{k}": v for k, v in headline.items() if isinstance(v, (int, float))})
        for p in plots:
            run.log({f"eval/plots/{p.stem}": wandb.Image(str(p))})
        lc = results.get("long_context") or {}
        rows = [[r["multiplier"], b["lo"], b["hi"], b["loss"], b["tokens"]]
                for r in lc.get("results", []) if not r.get("skipped") for b in r["buckets"]]
        if rows:
            run.log({"eval/long_context": wandb.Table(columns=["multiplier", "pos_lo", "pos_hi", "loss", "tokens"], data=rows)})
        gen = (results.get("generation") or {}).get("results") or []
        if gen:
            cols = list(gen[0].keys())
            run.log({"eval/generation": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in gen])})
        for k, v in headline.items():
            run.summary[f"eval/{k}"] = v
        return run.id
    finally:
        run.finish()
