"""STUDY_DIR/report.md: the variants of a study (pipeline/study/) side by side, with PNG plots.

Read from each variant's run directory (nothing is recomputed): eval/results.json (parameters, held-out
bits per byte, loss by position, generation cost), train/metrics.jsonl (loss curves against tokens
seen), train/stage.json (wall time, tokens/s). Plots, next to report.md:
- bpb_vs_params.png: val bits per byte against parameters, one line per architecture family;
- bpb_vs_tokens.png: every variant's loss curve in bits per byte against tokens seen (validation
  points, training loss thin), the eval stage's number at the end;
- loss_by_position.png: loss by position at the longest context multiplier, the training length marked;
- decode_cost.png: decode tokens/s (median, bars from the slowest to the fastest round) and the
  state / KV-cache size against the prompt length.
The same numbers go to STUDY_DIR/report.json, with the fingerprint of the variants' train and eval
stages it was made from: a rerun with nothing changed rewrites nothing (and logs nothing to W&B).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

from omegaconf import OmegaConf

from xlp.pipeline.core.layout import RunLayout, StudyLayout
from xlp.pipeline.core.stage import atomic_write_json, atomic_write_text, read_stage_json
from xlp.pipeline.eval.report import _f, _plt, _table, decode_speed_errorbar, label_axes, save_figure
from xlp.pipeline.study.plan import model_vocab
from xlp.pipeline.train.monitor import read_metrics
from xlp import xlstm_model  # count_params, flops_per_token: torch, loaded on first use (PEP 562)

if TYPE_CHECKING:
    from xlp.pipeline.study.plan import StudyPlan

REPORT_VERSION = 2  # bump when the report's content changes, so reruns rewrite it (2: colours by family past 10 variants)
PLOTS = ("bpb_vs_params.png", "bpb_vs_tokens.png", "loss_by_position.png", "decode_cost.png")


def family(model: dict) -> str:
    """The architecture family as the papers name it: xLSTM[m:s] (mLSTM:sLSTM blocks, ratio), xLSTM-large, Llama."""
    arch = model.get("arch")
    if arch == "llama":
        return "Llama"
    if arch == "xlstm_large":
        return "xLSTM-large"
    s = len(model.get("slstm_at") or [])
    m = int(model.get("num_blocks", 0)) - s
    if s == 0:
        return "xLSTM[1:0]"
    g = math.gcd(m, s)
    return f"xLSTM[{m // g}:{s // g}]"


def collect(plan: "StudyPlan") -> list[dict]:
    """One record per variant whose eval stage is done (in the study's order)."""
    rows = []
    for v in plan.variants:
        layout = RunLayout(v.run_dir)
        ev, tr = read_stage_json(layout.eval_dir), read_stage_json(layout.train_dir)
        if ev.get("status") != "done" or tr.get("status") != "done" or not layout.eval_results.is_file():
            continue
        results = json.loads(layout.eval_results.read_text())
        info, ppl = results.get("info", {}), results.get("ppl") or {}
        model = OmegaConf.to_container(v.cfg.model, resolve=True)
        model["vocab_size"] = info.get("vocab_size") or model_vocab(v.cfg)
        seq_len = int(v.cfg.data.seq_len)
        tokens = int(info.get("tokens_seen") or tr.get("metrics", {}).get("tokens_seen") or 0)
        bpt = ppl.get("bytes_per_token")
        curve = []
        for step, rec in sorted(read_metrics(layout.train.metrics).items()):
            if rec.get("train/tokens_seen") is None:
                continue
            curve.append({"step": step, "tokens": rec["train/tokens_seen"], "train_loss": rec.get("train/loss"),
                          "val_loss": rec.get("val/loss")})
        lc = [r for r in (results.get("long_context") or {}).get("results", []) if not r.get("skipped")]
        trained = ppl.get("trained") or {}
        tm = tr.get("metrics", {})
        rows.append({
            "name": v.name, "family": family(model), "arch": model["arch"], "d_model": model["d_model"],
            "num_blocks": model["num_blocks"],
            "params": int(info.get("params") or xlstm_model.count_params(model)),
            "params_non_embedding": xlstm_model.count_params(model, exclude_embedding=True),
            "tokens": tokens, "seq_len": seq_len, "steps": info.get("train_steps"),
            "flops": xlstm_model.flops_per_token(model, seq_len) * tokens,
            "train_s": tr.get("duration_s"), "tokens_per_s": tm.get("tokens_per_s"),
            "val_loss": trained.get("loss"), "val_bpb": trained.get("bpb"), "bytes_per_token": bpt,
            "untrained_bpb": (ppl.get("untrained") or {}).get("bpb"),
            "loss_beyond_train_len": lc[-1]["loss_beyond_train_len"] if lc else None,
            "long_context": lc[-1] if lc else None, "train_len": (results.get("long_context") or {}).get("train_len"),
            "generation": results.get("generation"),
            "curve": curve,
            "fingerprints": {"train": tr.get("fingerprint"), "eval": ev.get("fingerprint")},
        })
    return rows


def _bpb(loss: Optional[float], bytes_per_token: Optional[float]) -> Optional[float]:
    if loss is None or not bytes_per_token:
        return None
    return loss / math.log(2) / bytes_per_token


def _markers():
    return {"xLSTM[1:0]": "o", "xLSTM[7:1]": "s", "xLSTM-large": "^", "Llama": "D"}


def _styles(rows: list[dict]) -> dict[str, dict]:
    """Each variant's colour and line: its own colour while there are at most 10 variants (matplotlib's
    distinct colours); beyond that the 11th would wear the 1st one's, so each family gets a colour
    (in the order families first appear) and its variants a line style and marker each."""
    if len(rows) <= 10:
        return {r["name"]: {"color": f"C{i}", "ls": "-", "marker": "o"} for i, r in enumerate(rows)}
    families = list(dict.fromkeys(r["family"] for r in rows))
    seen: dict[str, int] = {}
    out = {}
    for r in rows:
        k = seen[r["family"]] = seen.get(r["family"], -1) + 1
        out[r["name"]] = {"color": f"C{families.index(r['family']) % 10}", "ls": ("-", "--", ":", "-.")[k % 4],
                          "marker": "os^Dv<>"[k % 7]}
    return out


def plot_bpb_vs_params(rows: list[dict], path: Path) -> Optional[Path]:
    pts = [r for r in rows if r["val_bpb"] is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for fam in dict.fromkeys(r["family"] for r in pts):
        mine = sorted((r for r in pts if r["family"] == fam), key=lambda r: r["params"])
        ax.plot([r["params"] for r in mine], [r["val_bpb"] for r in mine], marker=_markers().get(fam, "o"), label=fam)
        for r in mine:
            ax.annotate(r["name"], (r["params"], r["val_bpb"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    label_axes(ax, "parameters (embedding included)", "val bits per byte", "Held-out bits per byte against model size")
    return save_figure(fig, path)


def plot_bpb_vs_tokens(rows: list[dict], path: Path) -> Optional[Path]:
    if not any(r["curve"] and r["bytes_per_token"] for r in rows):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    styles = _styles(rows)
    for r in rows:
        bpt, st = r["bytes_per_token"], styles[r["name"]]
        if not bpt:
            continue
        train = [(c["tokens"], _bpb(c["train_loss"], bpt)) for c in r["curve"] if c["train_loss"] is not None]
        val = [(c["tokens"], _bpb(c["val_loss"], bpt)) for c in r["curve"] if c["val_loss"] is not None]
        if train:
            ax.plot(*zip(*train), color=st["color"], ls=st["ls"], lw=0.8, alpha=0.5)
        if val:
            ax.plot(*zip(*val), ms=3, **st, label=f"{r['name']} ({r['params'] / 1e6:.2f}M)")
        if r["val_bpb"] is not None:
            ax.plot([r["tokens"]], [r["val_bpb"]], "*", color=st["color"], ms=10)
    label_axes(ax, "tokens seen", "bits per byte", "Loss curves: validation (points), training (thin), eval stage (star)",
               title_size=10, legend_size=7, legend_cols=2)
    return save_figure(fig, path)


def plot_loss_by_position(rows: list[dict], path: Path) -> Optional[Path]:
    have = [r for r in rows if r["long_context"]]
    if not have:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    styles = _styles(rows)
    for r in have:
        lc = r["long_context"]
        pts = [(max(1.0, (b["lo"] + b["hi"]) / 2), b["loss"]) for b in lc["buckets"] if b["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), ms=3, **styles[r["name"]], label=f"{r['name']} ({lc['multiplier']}x = {lc['seq_len']} tokens)")
    train_len = have[0]["train_len"]
    if train_len:
        ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    label_axes(ax, "position (tokens of context)", "loss (nats / token)", "Loss by position, beyond the training length",
               legend_size=7)
    return save_figure(fig, path)


def plot_decode_cost(rows: list[dict], path: Path) -> Optional[Path]:
    have = [r for r in rows if (r["generation"] or {}).get("results")]
    if not have:
        return None
    styles = _styles(rows)
    plt = _plt()
    mib = 2.0 ** 20
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    for r in have:
        st = styles[r["name"]]
        gen = r["generation"]["results"]
        decode_speed_errorbar(a1, gen, fmt=st["marker"] + st["ls"], color=st["color"], label=r["name"])
        a2.plot([g["context"] for g in gen], [g["state_bytes"] / mib for g in gen], **st, label=r["name"])
    g0 = have[0]["generation"]
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a1.set_ylim(bottom=0)
    a1.set_ylabel("decode tokens / s (batch 1)")
    a1.set_title(f"Decode speed: median of {g0.get('repeats', 1)} rounds of {g0.get('gen_tokens')} tokens, "
                 "bars: slowest-fastest", fontsize=9)
    a2.set_yscale("log")
    a2.set_ylabel("MiB")
    a2.set_title("Recurrent state (xLSTM) / KV cache (Llama)", fontsize=9)
    fig.suptitle(f"Generation cost against context ({g0.get('device')})")
    return save_figure(fig, path)


def _human(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def write_markdown(path: Path, plan: "StudyPlan", rows: list[dict], plots: list[Path], missing: list[str]) -> None:
    names = {p.name for p in plots}
    base = plan.base
    md = [f"# Study report: {plan.name}\n",
          f"{len(rows)} variant(s) trained on the same tokenizer and shards ({', '.join(map(str, base.data.sources))}; "
          f"sequence length {base.data.seq_len}, vocabulary {base.tokenizer.vocab_size}). Made "
          f"{time.strftime('%Y-%m-%d %H:%M')} from each variant's run directory in {plan.study_dir}.\n"]
    if missing:
        md.append(f"Not in this report (no finished eval yet): {', '.join(missing)}.\n")
    md.append("## Variants\n")
    md.append("Parameters count the embedding (tied head once); FLOPs = training FLOPs per token "
              "(`xlp.xlstm_model.counts.flops_per_token`, forward + backward) x tokens seen; wall time = the train "
              "stage's, throughput = its tokens/s after the first step. Bits per byte: the eval stage's held-out "
              "loss / ln 2 / UTF-8 bytes per token (tokenizer-independent).\n")
    table = []
    for r in rows:
        gen = ((r["generation"] or {}).get("results") or [None])[-1]
        table.append([r["name"], r["family"], f"{r['d_model']} x {r['num_blocks']}", f"{r['params']:,}",
                      f"{r['params_non_embedding']:,}", f"{r['tokens']:,}", _human(r["flops"]),
                      f"{r['train_s']:.0f} s" if r["train_s"] is not None else "-",
                      f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                      _f(r["val_bpb"]), _f(r["untrained_bpb"]), _f(r["loss_beyond_train_len"]),
                      f"{gen['decode_tokens_per_s']:.1f} @ {gen['context']}" if gen else "-",
                      f"{gen['state_bytes'] / 2**20:.3f}" if gen else "-"])
    md.append(_table(["variant", "family", "d_model x blocks", "params", "non-embedding", "tokens", "train FLOPs",
                      "train wall time", "train tokens/s", "val bpb", "untrained bpb", "loss beyond train len",
                      "decode tok/s @ longest prompt", "state/KV MiB there"], table))
    md.append("")
    for name, title, text in (
        ("bpb_vs_params.png", "Quality against size", "One line per family; at equal parameters and tokens, lower is better."),
        ("bpb_vs_tokens.png", "Loss curves against tokens seen", "Validation loss during training (points), "
         "training loss (thin), the eval stage's held-out number (star), all in bits per byte."),
        ("loss_by_position.png", "Loss by position beyond the training length", "A curve that stays level past the "
         "dashed line extrapolates; one that rises does not."),
        ("decode_cost.png", "Generation cost against context", "Decode speed at batch 1 with its spread over rounds "
         "(contexts interleaved): differences inside the bars are noise. State memory: constant for xLSTM, linear "
         "in the context for a KV cache."),
    ):
        if name in names:
            md.append(f"## {title}\n\n{text}\n\n![{title}]({name})\n")
    gens = [r for r in rows if (r["generation"] or {}).get("results")]
    if gens:
        md.append("### Generation cost by prompt length\n")
        grows = []
        for r in gens:
            for g in r["generation"]["results"]:
                grows.append([r["name"], g["context"], g["decode_tokens_per_s"],
                              f"{g.get('decode_tokens_per_s_min', '-')}-{g.get('decode_tokens_per_s_max', '-')}",
                              g["state_bytes"] / 2**20, g["prefill_peak_bytes"] / 2**20, g["decode_peak_bytes"] / 2**20])
        md.append(_table(["variant", "prompt tokens", "decode tok/s (median)", "slowest-fastest round", "state/KV MiB",
                          "prefill peak MiB", "decode peak MiB"], grows))
    atomic_write_text(path, "\n".join(md))


def report_fingerprint(rows: list[dict]) -> str:
    blob = json.dumps({"version": REPORT_VERSION, "variants": [[r["name"], r["fingerprints"]] for r in rows]},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def update_report(plan: "StudyPlan", *, out: TextIO) -> str:
    """Write STUDY_DIR/report.md, its plots and report.json unless they were made from the same variant
    outputs; returns "ran", "skipped", or "none" (no variant has a finished eval)."""
    rows = collect(plan)
    if not rows:
        print("= report: no variant has a finished eval yet", file=out, flush=True)
        return "none"
    fp = report_fingerprint(rows)
    layout = StudyLayout(plan.study_dir)
    report_json, report_md = layout.report_json, layout.report
    try:
        old = json.loads(report_json.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        old = None
    if old == fp and report_md.is_file():
        print(f"= report: done (fingerprint {fp}), skipped", file=out, flush=True)
        return "skipped"
    layout.root.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_bpb_vs_params(rows, layout.plot(PLOTS[0])), plot_bpb_vs_tokens(rows, layout.plot(PLOTS[1])),
                         plot_loss_by_position(rows, layout.plot(PLOTS[2])), plot_decode_cost(rows, layout.plot(PLOTS[3])))
             if p is not None]
    missing = [v.name for v in plan.variants if v.name not in {r["name"] for r in rows}]
    write_markdown(report_md, plan, rows, plots, missing)
    wandb_id = log_wandb(plan, rows, plots)
    atomic_write_json(report_json, {"fingerprint": fp, "variants": rows, "missing": missing,
                                    "plots": [p.name for p in plots], "wandb_run_id": wandb_id})
    print(f"+ report: {report_md} ({len(rows)} variant(s), {len(plots)} plots)", file=out, flush=True)
    return "ran"


def log_wandb(plan: "StudyPlan", rows: list[dict], plots: list[Path]) -> Optional[str]:
    """The report's table and plots as one W&B run in the study's group (the variants' train and eval
    runs are in it too: `xlp study` sets their wandb.group); None when W&B is disabled."""
    cfg = plan.base
    mode = str(cfg.wandb.mode)
    if mode == "disabled":
        return None

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    group = str(cfg.wandb.group or cfg.run.name)
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=group, job_type="study",
                     name=f"{plan.name}-study", tags=list(cfg.wandb.tags or []) + ["study"], mode=mode,
                     dir=str(plan.study_dir), settings=wandb.Settings(console="off", silent=True),
                     reinit="finish_previous")
    try:
        cols = ["name", "family", "params", "params_non_embedding", "tokens", "flops", "train_s", "tokens_per_s",
                "val_bpb", "loss_beyond_train_len"]
        run.log({"study/variants": wandb.Table(columns=cols, data=[[_plain(r[c]) for c in cols] for r in rows])})
        for p in plots:
            run.log({f"study/plots/{p.stem}": wandb.Image(str(p))})
        return run.id
    finally:
        run.finish()


def _plain(x: Any) -> Any:
    return x if x is None or isinstance(x, (int, float, str)) else str(x)
