"""Resizing a run (issue 19): a checkpoint of N gloo ranks continues on M ranks with the same global
batch (grad_accum derived), taking the same rows at every step (the per-step hash of the global batch)
and the same losses as the run that never stopped; an impossible resize is refused before any rank
starts. Real DeepSpeed ranks on CPU (gloo), the trainer's own launcher, shards written by the data
library (tests/test_train.py's helpers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from xlp.pipeline.train.monitor import read_metrics
from test_train import TINY, make_shards, train  # noqa: F401  (make_shards: the fixture's)

HALF, STEPS = 6, 12
# 8 rows a step: 2 ranks x 4 rows, or 1 rank x 4 rows x grad_accum 2. Checkpoints only where the runs
# stop (the resized continuation reads the one of step HALF).
RESIZABLE = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0",
             "train.eval_batches=1", "train.save_every=0", "train.keep_checkpoints=5", "data.streams=4",
             "train.min_lr=3e-3"]  # a constant learning rate after warm-up: the same for 6 and 12 steps
# the same order and losses up to summation order (which ranks and micro-batches add which rows):
# fp32, ~1e-7 relative per step, after 12 Adam steps well inside 1e-4
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("elastic") / "shard")


def steps_of(run: Path) -> dict[int, dict]:
    return read_metrics(run / "train" / "metrics.jsonl")


def resized(tmp_path: Path, shards: Path, name: str, first: int, then: int, extra: list[str],
            then_extra: tuple[str, ...] = ()) -> Path:
    """HALF steps on `first` ranks, then on to STEPS on `then` ranks (with `then_extra`), in one run dir."""
    run = tmp_path / name
    train(run, shards, [*RESIZABLE, *extra, f"train.steps={HALF}"], procs=first)
    train(run, shards, [*RESIZABLE, *extra, *then_extra, f"train.steps={STEPS}"], procs=then)
    return run


def assert_same_trajectory(run: Path, ref: Path) -> None:
    got, want = steps_of(run), steps_of(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in want:
        assert got[s]["data/batch_hash"] == want[s]["data/batch_hash"], s  # the same rows, step by step
        assert got[s]["train/loss"] == pytest.approx(want[s]["train/loss"], rel=LOSS_RTOL), s
    hashes = [want[s]["data/batch_hash"] for s in want]
    assert len(set(hashes)) == len(hashes)  # every step a different batch: the hash tells them apart


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The run that never stopped: 2 ranks, STEPS steps, ZeRO-0."""
    run = tmp_path_factory.mktemp("elastic-ref") / "ref"
    train(run, shards, [*RESIZABLE, f"train.steps={STEPS}"], procs=2)
    return run


@pytest.mark.slow
def test_two_ranks_resume_on_one_and_back(shards, reference, tmp_path):
    down = resized(tmp_path, shards, "down", 2, 1, [])
    log = (down / "train" / "logs" / "rank_0.log").read_text()
    assert f"resuming 2-rank checkpoint step {HALF} on 1 rank, grad_accum 1 -> 2" in log, log[-3000:]
    result = json.loads((down / "train" / "result.json").read_text())
    assert result["world_size"] == 1 and result["grad_accum"] == 2 and result["global_batch_size"] == 8
    assert_same_trajectory(down, reference)

    # back up to 2 ranks, now with 2 loader worker processes each: still the same rows
    up = resized(tmp_path, shards, "up", 1, 2, [], then_extra=("train.num_workers=2",))
    assert f"resuming 1-rank checkpoint step {HALF} on 2 ranks, grad_accum 2 -> 1" in \
        (up / "train" / "logs" / "rank_0.log").read_text()
    assert_same_trajectory(up, reference)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])  # ZeRO-1 (and 2): partitioned optimizer; ZeRO-3: parameters too
def test_zero_partitions_two_ranks_resume_on_one(shards, reference, tmp_path, zero):
    ref = tmp_path / f"ref{zero}"
    train(ref, shards, [*RESIZABLE, f"train.zero_stage={zero}", f"train.steps={STEPS}"], procs=2)
    # the same rows as under ZeRO-0 (the order is the loader's, not the engine's)
    assert [r["data/batch_hash"] for r in steps_of(ref).values()] == \
        [r["data/batch_hash"] for r in steps_of(reference).values()]
    down = resized(tmp_path, shards, f"down{zero}", 2, 1, [f"train.zero_stage={zero}"])
    assert "resuming 2-rank checkpoint step 6 on 1 rank" in (down / "train" / "logs" / "rank_0.log").read_text()
    assert_same_trajectory(down, ref)


@pytest.mark.slow
def test_a_resize_the_global_batch_does_not_divide_is_refused(reference, tmp_path):
    """The train stage on 3 ranks over a 2-rank checkpoint of 8-row steps: refused before any rank starts."""
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.core.stage import StageContext
    from xlp.pipeline.stages import train as train_stage
    from xlp.pipeline.train.elastic import ResizeError

    run = tmp_path / "refused"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "train" / "logs")
    cfg = load_config(None, [f"run.dir={run}", *TINY, *RESIZABLE, "train.cpu_processes=3", f"train.steps={STEPS + 2}"])
    with pytest.raises(ResizeError, match=r"train.global_batch_size=8 rows does not split over 3 rank\(s\) of "
                                          r"train.micro_batch_size=4: 8 is not a multiple of 4 x 3 = 12\. "
                                          r"With micro_batch_size 4 the run continues on 1, 2 rank\(s\); "
                                          r"no micro-batch size splits 8 rows over 3 ranks"):
        train_stage.run(StageContext(name="train", cfg=cfg, run_dir=run, fingerprint="test"))
    assert not (run / "train" / "logs").exists()  # no rank was started

    # the same global batch on other terms: 1 rank of 8-row micro-batches continues; a different global
    # batch (null: 4 x 1 x 1 rank = 4 rows) is refused, naming both and the key that fixes it
    cfg = load_config(None, [f"run.dir={run}", *TINY, *RESIZABLE, "train.global_batch_size=null",
                             "train.cpu_processes=1", f"train.steps={STEPS + 2}"])
    with pytest.raises(ResizeError, match=r"global batch of 8 rows \(4 x grad_accum 1 x 2 rank\(s\)\); this launch "
                                          r"would take 4 \(4 x 1 x 1 rank\(s\)\): set train.global_batch_size=8"):
        train_stage.run(StageContext(name="train", cfg=cfg, run_dir=run, fingerprint="test"))
    assert not (run / "train" / "logs").exists()


def test_which_keys_define_the_trajectory():
    """train.num_workers changes nothing (not in the fingerprint); ranks, grad_accum and micro-batch
    size continue a run (the ranks refuse a different global batch); the global batch, data.streams
    and the mixture weights are the trajectory."""
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.core.stage import fingerprint
    from xlp.pipeline.core.registry import STAGES

    stage = {s.name: s for s in STAGES}["train"]
    up = {"tokenizer": "t", "shard": "s"}

    def fp(*overrides: str, trajectory: bool = False) -> str:
        return fingerprint(stage, load_config(None, [*TINY, *RESIZABLE, *overrides]), up, trajectory=trajectory)

    assert fp("train.num_workers=4") == fp()
    for continuing in ("train.cpu_processes=3", "train.grad_accum=2", "train.micro_batch_size=2",
                       "train.steps=50"):
        assert fp(continuing) != fp() and fp(continuing, trajectory=True) == fp(trajectory=True), continuing
    for other in ("train.global_batch_size=16", "data.streams=2", "run.seed=1"):
        assert fp(other, trajectory=True) != fp(trajectory=True), other
