"""The GPU campaign's `pipeline` part: the whole pipeline on one GPU, then a stop by SIGTERM and a resume.

    python benchmarks/campaign_pipeline.py RUN_DIR [--json PATH] [--dry-run] [key=value ...]

1. `xlp run campaign_gpu` (configs/campaign_gpu.yaml: an xlstm_large of ~126M parameters on the embedded
   corpus, bf16, train.compile, ZeRO-1 on one rank over NCCL, the Triton kernels), every stage: tokenizer,
   shard, train, eval. Each must end done.
2. `xlp run ... --stages train --force`: the same training again from step 0 (the first attempt's output
   moves to RUN_DIR/.stale/, kept), stopped by SIGTERM to `xlp` once it has logged --stop-at-step.
3. `xlp run ... --stages train`: resumes from the checkpoint the SIGTERM saved and trains to the end.
Then the two trainings must agree bitwise: every step's loss and gradient norm (metrics.jsonl) and the
consolidated model's files. Steps before the stop differing means the training is not reproducible on
this machine; steps after it, that the resume is not exact.

It fails (exit 1, each reason on a `FAILED:` line) when a stage does not end done, the resume does not
happen or differs, or a stage computed an op with the reference ops on CUDA (the kernel dispatch's
record, xlp.kernels.dispatch.used_backends, in the train and eval stages' metrics: "fallback"). It
records tok/s, MFU, peak GPU memory, val loss and bits per byte, and each stage's seconds as one JSON
line of --json (`"bench": "pipeline"`; benchmarks/campaign_table.py reads it).

--dry-run: the same three runs at a tiny size on this CPU (one gloo rank, fp32, no compile): what
tests/test_campaign.py runs. Needs the project's dependencies (Ray, DeepSpeed, OmegaConf, WebDataset)
importable with xlp.* (benchmarks/_xlp_path.sh); benchmarks/gpu_campaign.sh installs them from
--pipeline-wheels on a machine that lacks them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from xlp.pipeline.core.stage import file_sha256

CONFIG = "campaign_gpu"
# CPU, tiny: the three runs' code paths in seconds. Enough steps that the SIGTERM (relayed by xlp's driver,
# the stage's task and the launcher, about a second) lands before the training ends.
DRY = ["data.sources=[stdlib:json]", "tokenizer.vocab_size=512", "data.seq_len=32", "data.val_fraction=0.1",
       "model.d_model=32", "model.num_blocks=1", "model.num_heads=2", "train.device=cpu", "train.cpu_processes=1",
       "train.threads=1", "train.precision=fp32", "train.compile=false", "train.micro_batch_size=2",
       "train.steps=100", "train.warmup=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=50",
       "eval.parts=[ppl]", "eval.ppl_batches=1", "eval.baseline=false", "eval.plots=false", "eval.threads=1"]
STAGES = ("tokenizer", "shard", "train", "eval")


def stage_json(run_dir: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads((run_dir / stage / "stage.json").read_text())
    except (OSError, ValueError):
        return {}


def metrics_rows(path: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: row}; a step logged twice keeps its last row (as the trainer reads it)."""
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows[row["step"]] = row
    return rows


def xlp(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "xlp.pipeline.cli", *args]
    print("$ " + " ".join(cmd[2:]), flush=True)
    return subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT, **kw)


def fallbacks(stage: str, backends: dict) -> list[str]:
    """FAILED lines for every op `stage` computed with the reference ops on CUDA tensors."""
    return [f"stage {stage} computed {op} with the reference ops on CUDA (no Triton kernel; the stage log names why)"
            for op, used in sorted((backends or {}).get("cuda", {}).items()) if "fallback" in used]


def compare(ref: dict[int, dict], new: dict[int, dict], steps: int, resumed_at: Optional[int]) -> dict[str, Any]:
    """Where two trainings of the same config differ: losses and gradient norms of every step."""
    out: dict[str, Any] = {"steps_compared": 0, "first_diff_step": None}
    for step in range(1, steps + 1):
        a, b = ref.get(step), new.get(step)
        if a is None or b is None:
            out["first_diff_step"] = step
            out["diff"] = f"step {step} missing from the {'first' if a is None else 'resumed'} training's metrics"
            break
        for key in ("train/loss", "train/grad_norm", "data/batch_hash"):
            if a.get(key) != b.get(key):
                out["first_diff_step"] = step
                out["diff"] = f"step {step}: {key} {a.get(key)!r} then {b.get(key)!r}"
                break
        if out["first_diff_step"] is not None:
            break
        out["steps_compared"] = step
    first = out["first_diff_step"]
    out["losses_equal"] = first is None
    out["before_stop_equal"] = first is None or (resumed_at is not None and first > resumed_at)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/campaign_pipeline.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory (created; must not hold another run)")
    p.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    p.add_argument("--dry-run", action="store_true", help="tiny, on this CPU (one gloo rank)")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="SIGTERM once the second training logged this step (default: half of train.steps)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides after the campaign's own")
    a = p.parse_args(argv)
    run_dir = a.run_dir.absolute()
    if run_dir.exists() and any(run_dir.iterdir()):
        p.error(f"{run_dir} is not empty: the part compares trainings it ran itself; give a new folder")
    overrides = [*(DRY if a.dry_run else []), *a.overrides]
    base = ["run", CONFIG, *overrides, "--run-dir", str(run_dir)]
    steps = next((int(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("train.steps=")), 300)
    stop_at = a.stop_at_step or (2 if a.dry_run else max(1, steps // 2))
    failed: list[str] = []
    rec: dict[str, Any] = {"bench": "pipeline", "config": CONFIG, "overrides": overrides, "run_dir": str(run_dir),
                           "dry_run": a.dry_run, "steps": steps}
    t0 = time.perf_counter()

    # 1. every stage
    rc = xlp(base).wait()
    rec["first_run_s"] = round(time.perf_counter() - t0, 1)
    rec["stages"] = {}
    for stage in STAGES:
        marker = stage_json(run_dir, stage)
        rec["stages"][stage] = marker.get("duration_s")
        if marker.get("status") != "done":
            failed.append(f"stage {stage} is {marker.get('status', 'not run')} after `xlp run` (exit {rc})"
                          + (f": {marker['error'][:300]}" if marker.get("error") else ""))
    train = stage_json(run_dir, "train").get("metrics", {})
    ev = stage_json(run_dir, "eval").get("metrics", {})
    ref_rows = metrics_rows(run_dir / "train" / "metrics.jsonl")
    peak = [r.get("memory/max_allocated_gib") for r in ref_rows.values() if r.get("memory/max_allocated_gib")]
    rec.update(params=train.get("params"), tokens_per_s=train.get("tokens_per_s"), mfu=train.get("mfu"),
               peak_gib=max(peak) if peak else None, final_loss=train.get("final_loss"),
               val_loss=ev.get("val_loss"), val_bpb=ev.get("val_bpb"),
               kernel_backends={"train": train.get("kernel_backends"), "eval": ev.get("kernel_backends")})
    for stage in ("train", "eval"):
        if (rec["kernel_backends"][stage] or None) is None and not any(f.startswith(f"stage {stage} ") for f in failed):
            failed.append(f"stage {stage} recorded no kernel_backends in its metrics")
        failed += fallbacks(stage, rec["kernel_backends"][stage])
    if not a.dry_run and "cuda" not in (rec["kernel_backends"]["train"] or {}):
        failed.append("the train stage ran no kernel op on CUDA (train.device, or no GPU visible?)")
    ref_model = {f.name: file_sha256(f) for f in sorted((run_dir / "train" / "model").glob("*.safetensors"))}

    # 2. the training again, stopped by SIGTERM midway; 3. resumed
    if not failed:
        t1 = time.perf_counter()
        kept = set((run_dir / ".stale").glob("train-*"))
        proc = xlp([*base, "--stages", "train", "--force"])
        metrics = run_dir / "train" / "metrics.jsonl"
        # the first training's metrics.jsonl is there until --force moves it to .stale/: wait for the new one
        while proc.poll() is None and not set((run_dir / ".stale").glob("train-*")) - kept:
            time.sleep(0.05)
        while proc.poll() is None and max(metrics_rows(metrics), default=0) < stop_at:
            time.sleep(0.05)
        sent_at = max(metrics_rows(metrics), default=0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
        marker = stage_json(run_dir, "train")
        rec["sigterm_at_step"] = sent_at
        if rc == 0 or marker.get("status") != "failed" or "SIGTERM" not in str(marker.get("error")):
            failed.append(f"the second training was not stopped by SIGTERM (exit {rc}, stage {marker.get('status')}, "
                          f"SIGTERM sent at step {sent_at} of {steps})")
        else:
            rc = xlp([*base, "--stages", "train"]).wait()
            marker = stage_json(run_dir, "train")
            resumed = marker.get("metrics", {}).get("resumed_from_step")
            rec.update(resumed_from_step=resumed, resume_s=round(time.perf_counter() - t1, 1))
            if rc != 0 or marker.get("status") != "done":
                failed.append(f"the resumed training ended {marker.get('status')} (exit {rc})")
            elif not resumed:
                failed.append("the rerun after SIGTERM did not resume from a checkpoint (resumed_from_step is "
                              f"{resumed!r})")
            stale = sorted(set((run_dir / ".stale").glob("train-*")) - kept)
            if not stale:
                failed.append(f"the first training's output is not in {run_dir / '.stale'}")
            else:
                ref_rows = metrics_rows(stale[-1] / "metrics.jsonl")
                ref_model = {f.name: file_sha256(f) for f in sorted((stale[-1] / "model").glob("*.safetensors"))}
            cmp = compare(ref_rows, metrics_rows(metrics), steps, resumed)
            new_model = {f.name: file_sha256(f) for f in sorted((run_dir / "train" / "model").glob("*.safetensors"))}
            cmp["weights_equal"] = bool(ref_model) and new_model == ref_model
            rec["bitwise"] = cmp
            if not cmp["before_stop_equal"]:
                failed.append(f"the training is not reproducible here: a rerun from step 0 differs before the stop "
                              f"({cmp['diff']})")
            elif not cmp["losses_equal"]:
                failed.append(f"the resume is not exact: {cmp['diff']} (resumed from step {resumed})")
            if not cmp["weights_equal"]:
                failed.append("the resumed training's consolidated model differs from the first training's "
                              f"({sorted(new_model)} vs {sorted(ref_model)})")
            failed += fallbacks("train", marker.get("metrics", {}).get("kernel_backends"))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["ok"] = not failed
    rec["failed"] = failed
    for line in failed:
        print(f"FAILED: {line}", flush=True)
    s = rec["stages"]
    print("pipeline: " + ", ".join(f"{k} {v:.1f}s" if v is not None else f"{k} -" for k, v in s.items())
          + f"; {rec.get('tokens_per_s') or 0:,.0f} tok/s, val bpb {rec.get('val_bpb')}, "
          f"resumed from step {rec.get('resumed_from_step')}, bitwise {rec.get('bitwise', {}).get('losses_equal')}; "
          f"{'ok' if rec['ok'] else 'FAILED'}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        with a.json.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
