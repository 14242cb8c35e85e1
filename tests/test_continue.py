"""Long runs keep their work (issue 16): settings that change no result rerun nothing; a longer
train.steps continues the run from its checkpoints (exactly, with WSD before its decay); a run started
without `xlp run` is one the runner knows. Real `xlp run`, Ray, DeepSpeed on 2 gloo ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.node import node_name
from xlp.pipeline.train import checkpoint as ckpt
from xlp.pipeline.train.monitor import read_metrics

TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["model.d_model=32", "model.num_blocks=2", "model.num_heads=2", "data.seq_len=32",
         "train.micro_batch_size=4", "train.cpu_processes=2", "train.warmup=2", "wandb.mode=disabled",
         "train.schedule=wsd", "train.wsd_decay=0.2", "train.save_every=5", "train.keep_checkpoints=10",
         "train.eval_every=0", "train.eval_batches=2"]


def xlp(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([*XLP, *args], env=xlp_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"xlp {' '.join(args)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return xlp("run", str(TINY), f"run.dir={run_dir}", *SMALL, *overrides, "--stages", "train")


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    """A run directory whose tokenizer and shard stages are done (copied for each test)."""
    run = tmp_path_factory.mktemp("continue") / "data"
    xlp("run", str(TINY), f"run.dir={run}", *SMALL, "--stages", "tokenizer,shard")
    return run


def fresh(data_run: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(data_run, run)
    return run


def losses(run: Path) -> dict[int, float]:
    return {s: r["train/loss"] for s, r in read_metrics(run / "train" / "metrics.jsonl").items()}


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "train" / "model" / "model.safetensors")


def marker(run: Path) -> dict:
    return json.loads((run / "train" / "stage.json").read_text())


@pytest.mark.slow
def test_cadence_changes_rerun_nothing_and_a_longer_run_continues(data_run, tmp_path):
    run = fresh(data_run, tmp_path, "extend")
    train(run, "train.steps=20")
    first = (run / "train" / "stage.json").read_bytes()
    losses_20 = losses(run)
    assert sorted(losses_20) == list(range(1, 21))

    # checkpoint cadence and retention, evaluation cadence, logging, threads, hang check: train is skipped
    r = train(run, "train.steps=20", "train.save_every=7", "train.keep_checkpoints=3", "train.eval_every=3",
              "train.eval_batches=1", "train.log_every=1", "train.threads=1", "train.peak_tflops=1.0",
              "train.hang_timeout=120")
    assert "= train: done" in r.stdout and "skipped" in r.stdout, r.stdout
    assert (run / "train" / "stage.json").read_bytes() == first

    # twice the steps: continues from step 20 (inside the 20-step run's WSD decay: the log says so)
    r = train(run, "train.steps=40")
    assert "continuing the existing output" in r.stdout, r.stdout
    log = (run / "train" / "stage.log").read_text()
    assert "resumed from" in log and "decay" in log and "train.resume_from_step" in log, log[-3000:]
    m = marker(run)
    assert m["status"] == "done" and m["metrics"]["resumed_from_step"] == 20 and m["metrics"]["step"] == 40
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["nodes"] == [node_name()]
    steps = [s for s, _ in ckpt.complete_checkpoints(run / "train" / "checkpoints")]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # the first run's checkpoints are still there
    after = losses(run)
    assert sorted(after) == list(range(1, 41))
    assert all(after[s] == losses_20[s] for s in range(1, 21))  # its metrics too
    assert not (run / ".stale").exists()


@pytest.mark.slow
def test_wsd_extension_before_the_decay_is_the_longer_run(data_run, tmp_path):
    scratch = fresh(data_run, tmp_path, "scratch")
    train(scratch, "train.steps=40")

    run = fresh(data_run, tmp_path, "extended")
    train(run, "train.steps=20")
    # the 20-step run's decay began after step 16: continue from its step-15 checkpoint
    r = train(run, "train.steps=40", "train.resume_from_step=15")
    assert "continuing the existing output" in r.stdout
    assert marker(run)["metrics"]["resumed_from_step"] == 15
    a, b = weights(scratch), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s, e = losses(scratch), losses(run)
    assert [s[i] for i in range(16, 41)] == [e[i] for i in range(16, 41)]
    # the decayed checkpoint the continuation did not use is kept aside, not overwritten
    kept = run / ".stale" / f"train-{ckpt.name_of(20)}-superseded"
    assert (kept / "meta.json").is_file(), list((run / ".stale").iterdir())


@pytest.mark.slow
def test_a_direct_launch_is_a_run_the_runner_knows(data_run, tmp_path):
    run = fresh(data_run, tmp_path, "direct")
    env = xlp_env({"OMP_NUM_THREADS": "2"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # the run's config (RUN_DIR/config.yaml, written by `xlp run`) with a longer run, as a user would
    r = subprocess.run([sys.executable, "-m", "xlp.pipeline.train.main", "--run-dir", str(run), "train.steps=10",
                        "train.device=cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = marker(run)
    assert m["status"] == "done" and m["metrics"]["step"] == 10 and m["metrics"]["world_size"] == 1
    assert m["metrics"]["model_dir"] == str(run / "train" / "model")
    # the runner computes the same fingerprint from the same config: nothing reruns, eval may use it
    r = train(run, "train.steps=10")
    assert "= train: done" in r.stdout and "skipped" in r.stdout, r.stdout
    st = subprocess.run([*XLP, "status", str(run)], env=xlp_env(), capture_output=True, text=True, timeout=120)
    assert any(line.split()[:2] == ["train", "done"] for line in st.stdout.splitlines()), st.stdout
    assert os.path.isfile(run / "train" / "model" / "model.safetensors")
    # its checkpoints record the trajectory the runner computes (issue 29: whose checkpoints they are)
    root = run / "train" / "checkpoints"
    assert {ckpt.read_meta(p)[ckpt.TRAJECTORY] for _, p in ckpt.complete_checkpoints(root)} == {m["trajectory"]}

    # issue 29, item 3, as the user met it: the checkpoints folder a symlink to another run's folder; a
    # longer run (which continues this one's output) is refused before any rank starts, nothing touched
    ours = tmp_path / "ours"
    shutil.move(root, ours)
    other = tmp_path / "elsewhere" / "checkpoints"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("another run's\n")
    root.symlink_to(other)
    r = subprocess.run([*XLP, "run", str(TINY), f"run.dir={run}", *SMALL, "train.steps=12", "--stages", "train"],
                       env=xlp_env(), capture_output=True, text=True, timeout=600)
    said = r.stdout + r.stderr
    assert r.returncode != 0, said[-3000:]
    assert (f"{root} leads out of the run directory {run} through a symlink (to {other})" in said
            and f"set train.checkpoint_dir={other}" in said), said[-3000:]
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]  # nothing written there, nothing pruned
    assert marker(run)["status"] == "failed"


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"xlp run ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def status_row(run: Path, stage: str) -> str:
    r = xlp("status", str(run))
    return next(line for line in r.stdout.splitlines() if line.split()[:1] == [stage])


@pytest.mark.slow
def test_killed_after_the_last_checkpoint_the_rerun_keeps_the_final_metrics(data_run, tmp_path):
    """Issue 29, items 7 and 5. `xlp run` killed (SIGKILL) after its ranks saved the last checkpoint and
    ended, before it marked the stage done: the rerun resumes from that checkpoint with nothing left to
    train, and the stage's final loss, validation loss and throughput are the ones the killed attempt
    computed (from metrics.jsonl), not nan/None/0. Then the done marker truncated: `xlp status` names it,
    and `xlp run` resumes the stage from its checkpoints (nothing moved to .stale/, nothing retrained)."""
    run = fresh(data_run, tmp_path, "killed")
    command = [*XLP, "run", str(TINY), f"run.dir={run}", *SMALL, "train.steps=4", "train.cpu_processes=1",
               "--stages", "train"]
    # its own session: the kill reaches the driver and the embedded Ray it started, not this test
    proc = subprocess.Popen(command, env=xlp_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: (run / "train" / "logs" / "heartbeat_0.json").is_file(), proc, "rank 0 started")
        os.kill(proc.pid, signal.SIGSTOP)  # the driver can no longer mark the stage done; the ranks train on
        wait_for(lambda: (run / "train" / ".task-ended").is_file(), proc, "the stage's end", timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert marker(run)["status"] == "running"  # as the kill left it
    killed = json.loads((run / "train" / "result.json").read_text())  # what the ranks computed before
    assert killed["step"] == 4 and killed["final_loss"] == losses(run)[4] and killed["val_loss"] is not None
    assert status_row(run, "train").split()[1] == "failed"

    r = xlp(*command[len(XLP):])
    assert "> train: resuming" in r.stdout, r.stdout
    m = marker(run)["metrics"]
    assert (m["step"], m["resumed_from_step"], m["loop_steps"]) == (4, 4, 0), m
    assert m["final_loss"] == killed["final_loss"] and m["val_loss"] == killed["val_loss"], (m, killed)
    assert m["tokens_per_s"] == pytest.approx(killed["tokens_per_s"], rel=1e-9) and m["mfu"] > 0, (m, killed)
    assert m["metrics_from"] == str(run / "train" / "metrics.jsonl")
    assert "nothing left to train; the final metrics are the recorded ones" in (run / "train" / "stage.log").read_text()

    # item 5: the done marker cut short (a full disk, a bad copy): failed, and resumed in place
    path = run / "train" / "stage.json"
    path.write_bytes(path.read_bytes()[:300])
    assert "failed" in status_row(run, "train") and f"{path} is damaged: truncated" in status_row(run, "train")
    r = xlp(*command[len(XLP):])
    assert f"~ train: {path} is damaged: truncated" in r.stdout and "> train: resuming" in r.stdout, r.stdout
    assert not (run / ".stale").exists()
    again = marker(run)["metrics"]
    assert again["final_loss"] == killed["final_loss"] and again["resumed_from_step"] == 4
    assert [s for s, _ in ckpt.complete_checkpoints(run / "train" / "checkpoints")] == [4]


@pytest.mark.slow
def test_ctrl_c_during_training_is_named_ctrl_c_by_the_ranks_too(data_run, tmp_path):
    """Issue 29, item 12 (rest): a Ctrl-C of `xlp run` (SIGINT to its process group, as a terminal
    sends it) while the train stage runs. The stage's task stops its ranks with SIGTERM, and their log
    said "stopped by SIGTERM at step N"; now the ranks' line names the Ctrl-C (from `xlp run`'s stop
    request), a checkpoint is saved, the user sees one line, and the rerun resumes from that step."""
    run = fresh(data_run, tmp_path, "ctrl_c")
    command = [*XLP, "run", str(TINY), f"run.dir={run}", *SMALL, "train.steps=100000", "train.cpu_processes=1",
               "--stages", "train"]
    proc = subprocess.Popen(command, env=xlp_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = run / "train" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and max(read_metrics(metrics), default=0) >= 2, proc, "step 2")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "xlp run: stopped by Ctrl-C (SIGINT); run the same command again to resume"
    log = (run / "train" / "logs" / "rank_0.log").read_text()
    said = [line for line in log.splitlines() if "stopped by" in line]
    assert len(said) == 1 and "stopped by Ctrl-C (SIGINT) at step" in said[0] and "checkpoint saved" in said[0], said
    step = int(said[0].split(" at step ")[1].split(";")[0])
    assert "SIGTERM" not in stdout + stderr + log
    saved = [ckpt.read_meta(path)["step"] for _, path in ckpt.complete_checkpoints(run / "train" / "checkpoints")]
    assert max(saved) == step, saved

    # a longer WSD run whose decay starts after `step`: the same trajectory, so it continues from there
    r = xlp(*command[len(XLP):-2], f"train.steps={2 * step + 2}", "--stages", "train")
    assert "> train: resuming" in r.stdout and marker(run)["metrics"]["resumed_from_step"] == step, r.stdout


@pytest.mark.slow
def test_a_damaged_manifest_reruns_the_shard_stage_bookkeeping_only(data_run, tmp_path):
    """Issue 29, item 5: shard/manifest.json truncated, not text, or `{}`. A training rank's loader names
    the file; `xlp status` shows the shard stage failed, naming it (against the sha256 its marker records,
    or, for a marker written before it recorded one, by reading it); `xlp run` redoes the stage's
    bookkeeping: every shard kept, the same manifest written again, the same fingerprint (so what was
    trained on it stays done)."""
    import hashlib

    from xlp.pipeline.core.registry import SHARD
    from xlp.pipeline.core.stage import read_marker
    from xlp.pipeline.data.manifest import ManifestError
    from xlp.pipeline.data.shards import load_manifest

    run = fresh(data_run, tmp_path, "manifest")
    shard = run / "shard"
    manifest = shard / "manifest.json"
    good, marker_text = manifest.read_bytes(), (shard / "stage.json").read_text()
    before = json.loads(marker_text)
    assert before["outputs"] == {"manifest.json": hashlib.sha256(good).hexdigest()}
    unhashed = json.dumps({k: v for k, v in before.items() if k != "outputs"})  # a marker from before
    for data, reason in ((good[:len(good) // 2], "truncated: "), (b"\x89PNG\r\n" + bytes(64), "not UTF-8 text"),
                         (b"{}", "its dtype is None, not one of uint16, uint32")):
        manifest.write_bytes(data)
        with pytest.raises(ManifestError, match=f"{manifest} is damaged: {reason}"):
            load_manifest(shard)  # what the loaders of a training rank read
        m = read_marker(SHARD, shard)
        assert m["status"] == "failed" and m["damaged"].startswith(f"{manifest} is damaged: its sha256 is "), m
        (shard / "stage.json").write_text(unhashed)
        m = read_marker(SHARD, shard)
        assert m["status"] == "failed" and m["damaged"].startswith(f"{manifest} is damaged: {reason}"), m
        (shard / "stage.json").write_text(marker_text)
    manifest.write_bytes(good)
    (shard / "stage.json").write_text(unhashed)
    assert read_marker(SHARD, shard)["status"] == "done"  # an old marker over a whole manifest is accepted

    manifest.write_bytes(good[:len(good) // 2])
    (shard / "stage.json").write_text(marker_text)
    row = status_row(run, "shard")
    assert row.split()[1] == "failed" and f"{manifest} is damaged: its sha256 is" in row, row
    r = xlp("run", str(TINY), f"run.dir={run}", *SMALL, "--stages", "tokenizer,shard")
    assert "= tokenizer: done" in r.stdout and f"~ shard: {manifest} is damaged" in r.stdout, r.stdout
    assert "> shard: resuming" in r.stdout, r.stdout
    after = json.loads((shard / "stage.json").read_text())
    assert after["status"] == "done" and after["fingerprint"] == before["fingerprint"]
    assert after["metrics"]["shards_written"] == 0 and after["metrics"]["shards"] == before["metrics"]["shards"]
    assert manifest.read_bytes() == good and after["outputs"] == before["outputs"]
    assert not (run / ".stale").exists()
