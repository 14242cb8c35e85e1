"""Data mixtures (issue 19): `data.mixture` groups sharded apart, drawn by weight in training, a later
phase (`data.mixture_phases`) that continues the run from its checkpoint, tokens and validation loss
per group in metrics.jsonl, W&B (offline) and the train stage's metrics. Real `xlp run`: Ray shard
stage on two standard-library packages, the real tokenizer, DeepSpeed on 2 gloo ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xlp.pipeline.train.monitor import read_metrics
from test_continue import TINY, xlp
from test_train import read_wandb_history

MIXTURE = "data.mixture={web: {sources: ['stdlib:email'], weight: 0.8}, code: {sources: ['stdlib:asyncio'], weight: 0.2}}"
ANNEAL_AT = 7  # the phase's first step
PHASES = f"data.mixture_phases=[{{step: {ANNEAL_AT}, weights: {{web: 0.2, code: 0.8}}}}]"
LATER_PHASES = "data.mixture_phases=[{step: 10, weights: {web: 0.2, code: 0.8}}]"
SEQ = 32
ROWS = 20  # a step's global batch: 2 ranks x 10 rows
SETTINGS = ["model.d_model=32", "model.num_blocks=2", "model.num_heads=2", f"data.seq_len={SEQ}",
            "train.micro_batch_size=10", f"train.global_batch_size={ROWS}", "train.cpu_processes=2",
            "train.warmup=2", "train.save_every=6", "train.eval_every=6", "train.eval_batches=1",
            "data.streams=4", "data.val_fraction=0.2", "wandb.mode=offline", MIXTURE]


def run_xlp(run: Path, *overrides: str, stages: str = "train"):
    return xlp("run", str(TINY), f"run.dir={run}", *SETTINGS, *overrides, "--stages", stages)


def tokens_at(metrics: dict[int, dict], step: int) -> dict[str, int]:
    return {g: metrics[step][f"data/tokens/{g}"] for g in ("web", "code")} if step else {"web": 0, "code": 0}


def assert_share(tokens: dict[str, int], web: float) -> None:
    total = sum(tokens.values())
    assert tokens["web"] / total == pytest.approx(web, rel=0.01), tokens
    assert tokens["code"] / total == pytest.approx(1 - web, rel=0.01), tokens


@pytest.mark.slow
def test_two_groups_by_weight_with_an_annealing_phase(tmp_path):
    run = tmp_path / "mix"
    run_xlp(run, "train.steps=6", LATER_PHASES, stages="tokenizer,shard,train")
    manifest = json.loads((run / "shard" / "manifest.json").read_text())
    assert {s["group"] for s in manifest["shards"]} == {"web", "code"}
    assert manifest["groups"]["web"]["train"]["tokens"] > 0 and manifest["groups"]["code"]["train"]["tokens"] > 0

    # the annealing phase moved from step 10 to step 7, past the checkpoint of step 6: the run continues
    r = run_xlp(run, "train.steps=12", PHASES)
    assert "continuing the existing output" in r.stdout, r.stdout
    marker = json.loads((run / "train" / "stage.json").read_text())["metrics"]
    assert marker["resumed_from_step"] == 6
    log = (run / "train" / "stage.log").read_text()
    assert "data.mixture_phases changed after the checkpoint (step 6)" in log, log[-3000:]

    m = read_metrics(run / "train" / "metrics.jsonl")
    assert sorted(m) == list(range(1, 13))
    first = tokens_at(m, ANNEAL_AT - 1)
    assert sum(first.values()) == (ANNEAL_AT - 1) * ROWS * SEQ
    assert_share(first, 0.8)
    last = tokens_at(m, 12)
    assert_share({g: last[g] - first[g] for g in last}, 0.2)  # after the phase change: the new weights
    assert marker["tokens_by_source"] == last and sum(last.values()) == marker["tokens_seen"]

    # validation loss per group, in metrics.jsonl and the offline W&B run
    for step in (6, 12):
        assert {"val/loss", "val/loss/web", "val/loss/code"} <= set(m[step]), m[step].keys()
    files = sorted((run / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, list((run / "train").iterdir())
    logged = [row for f in files for row in read_wandb_history(f)]
    val = [row for row in logged if "val/loss/web" in row]
    assert val and all("val/loss/code" in row for row in val)
    assert any(row.get("data/tokens/code") == last["code"] for row in logged)
