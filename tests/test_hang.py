"""A rank that hangs or is lost is detected and named (issue 18): the heartbeat files and the detector
that judges them (fast), and (slow) real `xlp run`s with 2 DeepSpeed gloo ranks whose rank 1 is
stopped (SIGSTOP) or killed (SIGKILL) from outside: `xlp run` exits 75 naming the rank, and a rerun
resumes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.layout import TrainLayout
from xlp.pipeline.core.node import EXIT_RETRYABLE, node_name
from xlp.pipeline.train.heartbeat import Heartbeat, HangDetector, read_heartbeat
from xlp.pipeline.train.monitor import read_metrics

# ---------------------------------------------------------------------------------------------
# fast: heartbeat files and the detector, on the detector's clock (the `now` each check is given)


def beating(layout: TrainLayout, rank: int) -> Heartbeat:
    """A rank's heartbeat that writes only when the test says (no thread)."""
    beat = Heartbeat(layout.heartbeat(rank), rank=rank, interval_s=3600)
    beat.write()
    return beat


def test_heartbeat_file_says_who_where_how_far_and_keeps_beating(tmp_path):
    path = TrainLayout(tmp_path).heartbeat(1)
    beat = Heartbeat(path, rank=1, interval_s=0.2).start()
    try:
        first = read_heartbeat(path)
        assert first["rank"] == 1 and first["node"] == node_name() and first["pid"] == os.getpid()
        assert (first["phase"], first["step"], first["ended"]) == ("setup", 0, False)
        beat.progress(7, "train")
        deadline = time.monotonic() + 10
        while read_heartbeat(path)["step"] != 7:
            assert time.monotonic() < deadline, "the thread did not write the loop's progress"
            time.sleep(0.05)
        now = read_heartbeat(path)
        assert now["phase"] == "train" and now["progress_at"] > first["progress_at"]
        time.sleep(0.5)
        later = read_heartbeat(path)
        assert later["alive_at"] > now["alive_at"] and later["progress_at"] == now["progress_at"]
        with pytest.raises(ValueError, match="'training'.*setup, train, validate, save, finish"):
            beat.progress(8, "training")
    finally:
        beat.close()
    ended = read_heartbeat(path)
    assert ended["ended"] is True
    time.sleep(0.5)
    assert read_heartbeat(path) == ended  # no beats after close
    assert not list(path.parent.glob(".heartbeat_*"))  # every write was whole, renamed into place


def test_detector_names_a_silent_rank(tmp_path):
    layout = TrainLayout(tmp_path)
    b0, b1 = beating(layout, 0), beating(layout, 1)
    b0.progress(8, "train")
    b1.progress(7, "train")
    b0.write()
    b1.write()
    detector = HangDetector(layout, world_size=2, hang_timeout=30)
    assert detector.check(0.0) is None
    for t in (10.0, 20.0, 29.0):  # rank 0 beats on; rank 1 wrote its last at t=0
        b0.write()
        assert detector.check(t) is None
    b0.write()
    hang = detector.check(31.0)
    assert hang is not None and hang.ranks == (1,)
    assert hang.message == (f"train rank 1 on node {node_name()} (pid {os.getpid()}) stopped responding: no "
                            "heartbeat for 31 s (last: step 7, train); hang_timeout is 30 s")


def test_detector_judges_a_rank_from_its_first_heartbeat_on(tmp_path):
    layout = TrainLayout(tmp_path)
    detector = HangDetector(layout, world_size=2, hang_timeout=30)
    assert detector.check(0.0) is None  # no rank has started: nothing is judged
    assert detector.check(500.0) is None
    b0 = beating(layout, 0)
    assert detector.check(600.0) is None
    for t in (610.0, 630.0, 650.0):  # rank 1 still has no heartbeat, within 2 x hang_timeout of rank 0's
        b0.write()
        assert detector.check(t) is None
    b0.write()
    hang = detector.check(661.0)
    assert hang is not None and hang.ranks == (1,)
    assert hang.message.startswith("train rank 1 never started: no heartbeat 61 s after the first rank's first")

    # a rank whose work is over is not judged, however long it stays quiet
    layout = TrainLayout(tmp_path / "ended")
    b0, b1 = beating(layout, 0), beating(layout, 1)
    detector = HangDetector(layout, world_size=2, hang_timeout=30)
    assert detector.check(0.0) is None
    b1.close()
    for t in (20.0, 40.0, 60.0, 80.0):
        b0.write()
        assert detector.check(t) is None


def test_detector_names_the_rank_the_others_wait_for(tmp_path):
    layout = TrainLayout(tmp_path)
    beats = [beating(layout, r) for r in range(3)]
    detector = HangDetector(layout, world_size=3, hang_timeout=30)
    for t in (0.0, 20.0, 40.0, 60.0):  # set-up (restore, engine, loaders) is slow but not judged
        for b in beats:
            b.write()
        assert detector.check(t) is None
    beats[0].progress(8, "train")
    beats[1].progress(7, "save")  # rank 1 stuck saving step 7's checkpoint: its peers wait in step 8
    beats[2].progress(8, "train")
    for t in (61.0, 75.0, 90.0):  # alive, but no progress since t=61
        for b in beats:
            b.write()
        assert detector.check(t) is None
    for b in beats:
        b.write()
    hang = detector.check(92.0)
    assert hang is not None and hang.ranks == (1,)
    assert hang.message == (f"train ranks made no progress for 31 s while every rank is alive (stuck in a "
                            f"collective?): rank 1 on node {node_name()} (pid {os.getpid()}) is behind the "
                            "others, at step 7, save; hang_timeout is 30 s")

    # all at the same place: every one is named
    beats[1].progress(8, "train")
    for b in beats:
        b.write()
    assert detector.check(93.0) is None  # rank 1 moved: progress
    for b in beats:
        b.write()
    hang = detector.check(124.0)
    assert hang is not None and hang.ranks == (0, 1, 2)
    assert "every rank is at step 8, train: rank 0 on node" in hang.message

    # rank 2 waits for its data (a hung network file system); the others wait for it in a collective
    beats[0].progress(9, "train")
    beats[1].progress(9, "train")
    beats[2].progress(9, "train", reading_data=True)
    for b in beats:
        b.write()
    assert detector.check(125.0) is None
    for b in beats:
        b.write()
    hang = detector.check(156.0)
    assert hang is not None and hang.ranks == (2,)
    assert "rank 2 on node" in hang.message and "is behind the others, at step 9, train, reading data" in hang.message


def test_detector_ignores_a_file_that_is_not_a_heartbeat(tmp_path):
    layout = TrainLayout(tmp_path)
    b0 = beating(layout, 0)
    layout.heartbeat(1).write_text(json.dumps({"rank": 1, "step": "seven"}))
    detector = HangDetector(layout, world_size=2, hang_timeout=30)
    assert detector.check(0.0) is None
    b0.write()
    assert detector.check(20.0) is None
    b0.write()
    hang = detector.check(61.0)  # rank 1 counts as never started, not as a rank at step "seven"
    assert hang is not None and hang.ranks == (1,) and "never started" in hang.message


def test_srun_output_names_the_rank_the_cluster_lost(tmp_path):
    """srun's own report lines (Slurm 23) decide between a lost rank and a rank's own error: with
    --kill-on-bad-exit srun kills every task once one has failed, so only the first failure counts."""
    from xlp.pipeline.cluster.launch import srun_lost_rank

    layout = TrainLayout(tmp_path)
    layout.logs.mkdir(parents=True)
    killed_first = ("srun: error: xlp-node2: task 1: Killed\nsrun: Terminating StepId=7.2\n"
                    "srun: error: xlp-node1: task 0: Exited with exit code 1\n")
    layout.rank_error(0).write_text("RuntimeError: Connection closed by peer\n")  # rank 0 lost its peer
    lost = srun_lost_rank(killed_first, layout)
    assert lost is not None and lost.lost and lost.rank == 1 and "xlp-node2" in lost.how and "SIGKILL" in lost.how

    failed_first = ("srun: error: xlp-node1: task 0: Exited with exit code 1\nsrun: Terminating StepId=7.2\n"
                    "srun: error: xlp-node2: task 1: Killed\n")  # rank 0 raised; srun then killed rank 1
    assert srun_lost_rank(failed_first, layout) is None

    layout.rank_error(1).write_text("ValueError: bad shard\n")  # a Killed rank that had raised first is its own error
    assert srun_lost_rank(killed_first, layout) is None

    b = Heartbeat(layout.heartbeat(1), rank=1, interval_s=3600)
    b.state["node"] = "xlp-node2"  # the rank on the node that failed
    b.write()
    node_lost = srun_lost_rank("srun: error: Node failure on xlp-node2\nsrun: error: xlp-node1: task 0: Killed\n"
                               "srun: error: xlp-node2: task 1: Killed\n", layout)
    assert node_lost is not None and node_lost.lost and node_lost.rank == 1
    assert "node failure on xlp-node2" in node_lost.how


# ---------------------------------------------------------------------------------------------
# slow: real `xlp run`s

TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["model.d_model=32", "model.num_blocks=2", "model.num_heads=2", "data.seq_len=32",
         "train.micro_batch_size=4", "train.cpu_processes=2", "train.warmup=2", "wandb.mode=disabled",
         "train.eval_every=0", "train.eval_batches=2", "train.log_every=50"]
HANG_TIMEOUT = 20


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    """A run directory whose tokenizer and shard stages are done (copied for each test)."""
    run = tmp_path_factory.mktemp("hang") / "data"
    r = subprocess.run([*XLP, "run", str(TINY), *SMALL, "--run-dir", str(run), "--stages", "tokenizer,shard"],
                       env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def train_command(run: Path, *overrides: str) -> list[str]:
    return [*XLP, "run", str(TINY), *SMALL, *overrides, "--run-dir", str(run), "--stages", "train"]


def rank_beat(run: Path, rank: int, ready, proc: subprocess.Popen, timeout: float = 240) -> dict:
    """Rank `rank`'s heartbeat, once `ready(heartbeat)` holds."""
    path = TrainLayout(run / "train").heartbeat(rank)
    deadline = time.monotonic() + timeout
    while True:
        beat = read_heartbeat(path)
        if beat is not None and ready(beat):
            return beat
        if proc.poll() is not None:
            raise AssertionError(f"xlp run ended ({proc.returncode}) first:\n{proc.stdout.read()[-3000:]}\n"
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no heartbeat of rank {rank} that is ready: {beat}"
        time.sleep(0.1)


def is_rank_process(pid: int) -> bool:
    try:
        return b"xlp.pipeline.train.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone


def end_rank_process(pid: Optional[int]) -> None:
    """Kill a rank process this test stopped, if it outlived the run (by pid, checking it is a rank)."""
    if pid is not None and is_rank_process(pid):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)


def marker(run: Path) -> dict:
    return json.loads((run / "train" / "stage.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "ray"])  # ray: Ray Train workers, killed through Ray tasks
def test_a_stopped_rank_is_named_and_xlp_run_exits_75(data_run, tmp_path, launcher):
    run = tmp_path / "stopped"
    shutil.copytree(data_run, run)
    proc = subprocess.Popen(train_command(run, "train.steps=100000", "train.save_every=20",
                                          f"train.hang_timeout={HANG_TIMEOUT}", f"train.launcher={launcher}"),
                            env=xlp_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        beat = rank_beat(run, 1, lambda b: b["phase"] == "train" and b["step"] >= 2, proc)
        pid = beat["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=HANG_TIMEOUT + 120)
        waited = time.monotonic() - stopped_at
        assert proc.returncode == EXIT_RETRYABLE, out[-3000:] + err[-3000:]
        # judged after hang_timeout of silence (less up to one beat and one look), not before, not much later
        assert HANG_TIMEOUT - 5 < waited < HANG_TIMEOUT + 30, waited
        assert f"train rank 1 on node {node_name()} (pid {pid}) stopped responding: no heartbeat for" in err, err
        assert f"hang_timeout is {HANG_TIMEOUT} s" in err and "rank 0 on" not in err, err
        m = marker(run)
        assert m["status"] == "failed" and "stopped responding" in m["error"], m
        assert "stopped responding" in (run / "train" / "stage.log").read_text()
        # the launcher ended the ranks, the stopped one too
        assert not is_rank_process(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        end_rank_process(pid)


@pytest.mark.slow
def test_a_killed_rank_is_named_and_a_rerun_resumes(data_run, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(data_run, run)
    command = train_command(run, "train.steps=60", "train.save_every=10", f"train.hang_timeout={HANG_TIMEOUT}")
    proc = subprocess.Popen(command, env=xlp_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "train" / "metrics.jsonl"
    pid = None
    try:
        pid = rank_beat(run, 1, lambda b: True, proc)["pid"]
        deadline = time.monotonic() + 240
        while (max(read_metrics(metrics), default=0) if metrics.is_file() else 0) < 15:  # step 10 is saved
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_RETRYABLE, out[-3000:] + err[-3000:]
        assert f"train rank 1 on node {node_name()} (pid {pid}) was lost (killed by SIGKILL)" in err, err
        assert marker(run)["status"] == "failed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        end_rank_process(pid)

    # the same command again: resumes from the last checkpoint and finishes
    r = subprocess.run(command, env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = marker(run)
    assert m["status"] == "done" and m["metrics"]["step"] == 60, m
    assert 10 <= m["metrics"]["resumed_from_step"] < 60 and m["metrics"]["resumed_from_step"] % 10 == 0, m
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["nodes"] == [node_name()], m


@pytest.mark.slow
def test_a_rank_stuck_while_alive_is_named(tmp_path):
    from test_train import make_shards, write_config

    from xlp.pipeline.cluster.launch import RanksLost, launch

    shards = make_shards(tmp_path / "shard")
    run = tmp_path / "stuck"
    config = write_config(run, ["train.cpu_processes=2", "train.steps=1000", "train.save_every=10",
                                "train.eval_every=0", f"train.hang_timeout={HANG_TIMEOUT}"])
    with pytest.raises(RanksLost) as failed:  # rank 1 sleeps after saving step 10; rank 0 waits in step 11
        launch(run, config=config, cpu_processes=2, shard_dir=shards, hang_timeout=HANG_TIMEOUT,
               hooks="train_faults:STALL_RANK_1_AFTER_SAVE_10")
    message = str(failed.value)
    assert message.startswith("train ranks made no progress for "), message
    assert "while every rank is alive (stuck in a collective?)" in message, message
    assert f"rank 1 on node {node_name()} (pid " in message and "is behind the others, at step 10, save" in message
    assert "rank 0 on" not in message, message
    beat = read_heartbeat(TrainLayout(run / "train").heartbeat(1))
    assert not is_rank_process(beat["pid"])  # ended, not left sleeping
