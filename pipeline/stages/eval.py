"""The `eval` stage: what a researcher needs to judge the run, from RUN_DIR/train/model.

Parts (`eval.parts`, each optional; see pipeline/eval/):
- ppl:          held-out loss, perplexity, bits per byte on the val split; the untrained model of the
                same config and seed beside it (eval.baseline)
- long_context: loss by position bucket at eval.context_multipliers x data.seq_len
- generation:   tokens/s and peak memory at batch 1 after prompts of eval.gen_contexts tokens
- recall:       MQAR-style associative recall, zero-shot
- lm_eval:      lm-evaluation-harness on eval.tasks through our `xlp` model class (offline: the
                bundled configs/eval/ tasks on cloze items built from the val split)

Writes RUN_DIR/eval/: results.json (everything), metrics.json (headline numbers, also the stage's
metrics), report.md with PNG plots, lm_eval/ (task data, task YAMLs, lm-eval's results), wandb/. The
result files appear there only when all of them are whole (`run`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from xlp.pipeline.core import registry
from xlp.pipeline.core.config import section
from xlp.pipeline.core.diskfull import DiskFull, disk_full, is_disk_full, writing
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.core.stage import StageContext, atomic_write_text
from xlp.pipeline.eval import common, gencost, ppl, recall, report
from xlp.pipeline.eval.cloze import DATA_FILE, TASKS_DIR, build_items, write_items, write_task_dir
from xlp.pipeline.train.monitor import read_metrics
from xlp.kernels.dispatch import reset_used_backends, used_backends
from xlp.xlstm_model import count_params

STAGE = registry.EVAL
PARTIAL = ".partial"  # RUN_DIR/eval/.partial/: this attempt's result files until all are whole


def _log(msg: str) -> None:
    print(msg, flush=True)


def headline_metrics(results: dict) -> dict:
    """The flat numbers `xlp status` and `xlp compare` show."""
    h: dict = {}
    ppl = results.get("ppl") or {}
    if ppl.get("trained"):
        h.update(val_loss=ppl["trained"]["loss"], val_ppl=ppl["trained"]["ppl"], val_bpb=ppl["trained"]["bpb"],
                 bytes_per_token=ppl.get("bytes_per_token"))
    if ppl.get("untrained"):
        h.update(untrained_loss=ppl["untrained"]["loss"], untrained_bpb=ppl["untrained"]["bpb"])
    lc = results.get("long_context") or {}
    for r in lc.get("results", []):
        if not r.get("skipped"):
            h[f"loss_{r['multiplier']}x"] = r["loss"]
            if r["loss_beyond_train_len"] is not None:
                h["loss_beyond_train_len"] = r["loss_beyond_train_len"]  # from the longest multiplier
    gen = (results.get("generation") or {}).get("results") or []
    for r in gen:
        h[f"gen_{r['context']}_decode_tok_s"] = r["decode_tokens_per_s"]
        h[f"gen_{r['context']}_decode_peak_mib"] = round(r["decode_peak_bytes"] / 2**20, 2)
        h[f"gen_{r['context']}_state_mib"] = round(r["state_bytes"] / 2**20, 3)
    if gen:
        h["gen_decode_tok_s_max_ctx"] = gen[-1]["decode_tokens_per_s"]
    rec = [r for r in (results.get("recall") or {}).get("results", []) if not r.get("skipped")]
    for r in rec:
        h[f"recall_acc_{r['pairs']}"] = r["acc"]
    if rec:
        h["recall_acc"] = sum(r["acc"] for r in rec) / len(rec)
    lm = results.get("lm_eval") or {}
    for task, metrics in (lm.get("results") or {}).items():
        for name, value in metrics.items():
            if "stderr" not in name and name != "n":
                h[f"{task}/{name}"] = value
    return h


def run(ctx: StageContext) -> dict:
    """The eval stage. Its result files (results.json, metrics.json, report.md, the plots,
    lm_eval/results.json) are written into RUN_DIR/eval/.partial/ and moved into RUN_DIR/eval/ once all
    are whole (metrics.json last): a failed eval leaves nothing there that looks like a result (what it
    wrote stays in .partial/, which the next run moves to RUN_DIR/.stale/ with the rest of the attempt).
    A full disk anywhere raises DiskFull naming the file (or the eval folder, when the writer did not say)."""
    out = ctx.layout.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    try:
        return _run(ctx, partial)
    except Exception as e:
        if partial.exists():
            _log(f"eval: failed; what it had written is in {partial} (not a result)")
        if not isinstance(e, DiskFull) and is_disk_full(e):
            raise disk_full(getattr(e, "filename", None) or out) from e
        raise


def _publish(partial: Path, out: Path, last_name: str) -> None:
    """Move the result files from `partial` into `out` (renames: no disk space needed); `last_name`
    (metrics.json, what `xlp compare` reads) last."""
    files = sorted(p for p in partial.rglob("*") if p.is_file())
    last = [p for p in files if p.relative_to(partial) == Path(last_name)]
    for p in [p for p in files if p not in last] + last:
        target = out / p.relative_to(partial)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    shutil.rmtree(partial)


def _run(ctx: StageContext, partial: Path) -> dict:
    import torch

    t_start = time.time()
    cfg = ctx.cfg
    ec = section(cfg, "eval")
    section(cfg, "kernels").apply()  # the run's kernels.*, whatever this process's environment says
    reset_used_backends()  # the stage's metrics name the kernels this stage ran (a Ray worker runs many tasks)
    layout = ctx.layout
    out = layout.eval_dir
    if partial.exists():  # an earlier attempt's, called directly (the runner moves a failed attempt aside)
        shutil.rmtree(partial)
    partial.mkdir()
    run_dir = Path(ctx.run_dir)
    shard_dir = layout.shard_dir
    threads = common.set_threads(ec.threads)
    device = common.pick_device(ec.device)
    seq_len = int(cfg.data.seq_len)
    seed = int(cfg.run.seed)

    model = common.load_trained(run_dir, device)
    mcfg = model.config
    tok = common.load_tokenizer(run_dir)
    train_result = dict(ctx.input_metrics("train"))
    train_log = read_metrics(layout.train.metrics)
    if train_log and not train_result.get("step"):  # the stage marker is missing (a model trained elsewhere)
        last = max(train_log)
        train_result.update(step=last, tokens_seen=train_log[last].get("train/tokens_seen"))
    info = {
        "run_name": str(cfg.run.name), "arch": mcfg.arch, "params": count_params(model),
        "vocab_size": mcfg.vocab_size, "tokenizer_vocab": tok.vocab_size, "seq_len": seq_len,
        "train_steps": train_result.get("step"), "tokens_seen": train_result.get("tokens_seen") or 0,
        "device": str(device), "threads": threads, "time": t_start,
        "torch": torch.__version__,
    }
    results: dict = {"info": info, "config": OmegaConf.to_container(cfg.eval, resolve=True)}
    _log(f"eval: {mcfg.arch}, {info['params'] / 1e6:.2f}M params on {device} ({threads} threads); "
         f"parts: {', '.join(ec.parts)}")
    untrained = None
    if ec.baseline and ("ppl" in ec.parts or "recall" in ec.parts):
        untrained = common.build_untrained(copy.deepcopy(mcfg), seed, device)

    if "ppl" in ec.parts:
        models = {"trained": model}
        if untrained is not None:
            models["untrained"] = untrained
        blen = common.token_byte_lengths(tok, mcfg.vocab_size)
        res = ppl.perplexity(models, shard_dir, seq_len=seq_len, batch_size=ec.batch_size,
                             max_batches=ec.ppl_batches, byte_lengths=blen, device=device, log=_log)
        if not res.get("skipped") and res.get("bytes_per_token"):
            # the loss of a uniform prediction over the model's vocabulary: an untrained model is near it
            res["uniform_loss"] = math.log(mcfg.vocab_size)
            res["uniform_bpb"] = math.log2(mcfg.vocab_size) / res["bytes_per_token"]
        results["ppl"] = res

    if "long_context" in ec.parts:
        results["long_context"] = ppl.long_context(
            model, shard_dir, train_len=seq_len, multipliers=list(ec.context_multipliers),
            tokens_per_mult=ec.long_context_tokens, batch_size=ec.batch_size,
            buckets=list(ec.position_buckets) or None, device=device, log=_log)

    if "generation" in ec.parts:
        results["generation"] = gencost.generation_cost(
            model, contexts=list(ec.gen_contexts), gen_tokens=ec.gen_tokens, prefill_chunk=ec.prefill_chunk,
            vocab_size=tok.vocab_size, device=device, seed=ec.seed, repeats=ec.gen_repeats, log=_log)

    if "recall" in ec.parts:
        first = 260 if tok.vocab_size - 260 >= 2 * max(ec.recall_pairs) else 4  # past the byte pieces if room
        kw = dict(pairs=list(ec.recall_pairs), queries=ec.recall_queries, trials=ec.recall_trials,
                  batch_size=ec.recall_batch_size, vocab_size=tok.vocab_size, eos_id=tok.eos_id, device=device,
                  seed=ec.seed, first_id=first)
        rec = recall.recall_probe(model, log=_log, **kw)
        if untrained is not None:
            base = recall.recall_probe(untrained, log=lambda m: _log(m.replace("eval recall", "eval recall (untrained)")), **kw)
            for r, b in zip(rec["results"], base["results"]):
                if not r.get("skipped"):
                    r["untrained_acc"] = b["acc"]
        results["recall"] = rec
    del untrained

    if "lm_eval" in ec.parts:
        results["lm_eval"] = _lm_eval(ec, layout, shard_dir, model, tok, seq_len, device,
                                      partial / layout.lm_eval_dir.relative_to(out) / "results.json")

    info["seconds"] = round(time.time() - t_start, 1)
    headline = headline_metrics(results)
    common.write_json(partial / layout.eval_results.name, results)
    plots = []
    if ec.plots:
        plots = report.make_plots(partial, results, train_log, mcfg.arch)
    report.write_report(partial / layout.eval_report.name, results, plots)
    common.write_json(partial / layout.eval_metrics.name, headline)
    wandb_id = None
    if str(cfg.wandb.mode) != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_id = report.log_wandb(out, cfg, headline, results, plots)
    _publish(partial, out, layout.eval_metrics.name)
    _log(f"eval: report {layout.eval_report}")
    return {**headline, "report": str(layout.eval_report), "plots": [p.name for p in plots], "wandb_run_id": wandb_id,
            "seconds": info["seconds"], "kernel_backends": used_backends()}


def _lm_eval(ec, layout: RunLayout, shard_dir: Path, model, tok, seq_len: int, device, results_file: Path) -> dict:
    t0 = time.time()
    lm_dir = layout.lm_eval_dir
    if ec.lm_eval_offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_CACHE", str(lm_dir / "hf_cache"))
    try:
        from xlp.pipeline.eval.harness import XLPLM, flatten_results, run_tasks
    except ImportError as e:
        raise RuntimeError(
            f"eval.parts has lm_eval but lm-evaluation-harness is not importable ({e}); install it with "
            "`pip install -e '.[eval]'` (or drop lm_eval from eval.parts)") from None

    items = build_items(shard_dir, tok, n_items=ec.cloze_items, context_chars=ec.cloze_context_chars, seed=ec.seed)
    if not items:
        raise RuntimeError("eval: no val document has a line to predict; the bundled lm-eval tasks need a bigger "
                           "val split (data.val_fraction)")
    data = write_items(items, lm_dir / DATA_FILE)
    task_dir = lm_dir / TASKS_DIR
    write_task_dir(task_dir, data)
    max_length = ec.lm_eval_max_length or seq_len
    lm = XLPLM(model=model, tokenizer=tok, device=device.type, batch_size=ec.lm_eval_batch_size, max_length=max_length)
    _log(f"eval lm-eval: tasks {', '.join(ec.tasks)} ({len(items)} cloze items, limit {ec.lm_eval_limit or 'none'})")
    res = run_tasks(lm, list(ec.tasks), include_path=task_dir, limit=ec.lm_eval_limit or None,
                    offline=ec.lm_eval_offline)
    flat = flatten_results(res)

    from lm_eval.utils import handle_non_serializable

    keep = {k: v for k, v in res.items() if k not in ("samples",)}
    with writing(results_file):
        atomic_write_text(results_file, json.dumps(keep, indent=2, default=handle_non_serializable))
    for task, metrics in flat.items():
        _log(f"eval lm-eval: {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "stderr" not in k))
    return {"tasks": list(ec.tasks), "limit": ec.lm_eval_limit, "max_length": max_length, "items": len(items),
            "results": flat, "seconds": round(time.time() - t0, 1)}
