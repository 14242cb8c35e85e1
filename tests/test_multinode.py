"""The pipeline across two nodes of a real Slurm cluster on this machine (infra/local-slurm.sh --nodes 2:
one slurmd per node, each node a network namespace with its own address and host name), and a node's
ranks lost mid-training: the job requeues itself through Slurm and ends with the weights an
uninterrupted run has, bit for bit. On a 2-node Ray cluster, Ray Train restarts a lost worker's ranks
from the checkpoint, with the same result."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, XLP, xlp_env
from test_submit import QUICK_EVAL, TINY, assert_pipeline_complete, job_id_of, xlp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
                       reason="the local nodes are network namespaces: needs root, ip and nsenter"),
]

NODES = ["xlp-node1", "xlp-node2"]
# one rank per node, one thread each (2 cores here); enough steps that a rank can be killed between
# the first checkpoint and the end; small partitions so that both nodes' Ray workers write shards
TWO_NODES = ["slurm.nodes=2", "slurm.cpus_per_task=2", "train.cpu_processes=1", "train.threads=1",
             "train.steps=60", "train.save_every=20", "data.partition_bytes=100000", *QUICK_EVAL]


@pytest.fixture(scope="module")
def slurm_two_nodes():
    proc = subprocess.run(["bash", str(REPO / "infra" / "local-slurm.sh"), "--nodes", "2"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[0] for line in out.splitlines()) == NODES


def stage_json(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


def weights(run_dir: Path) -> dict[str, bytes]:
    """Every tensor's bytes (the file's bytes are not comparable: safetensors writes its metadata map
    in no fixed order)."""
    import torch
    from safetensors import safe_open

    out = {}
    for path in sorted((run_dir / "train" / "model").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[f"{path.name}:{name}:{t.dtype}:{tuple(t.shape)}"] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert out, f"no weights in {run_dir}"
    return out


def rank_pids_on(node: str) -> list[int]:
    """The training ranks' processes running on `node` (in its network namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"xlp.pipeline.train.main" in cmdline:
            found.append(int(pid))
    return found


def slurm_state(job: str) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", 0))


@pytest.fixture(scope="module")
def requeued(slurm_two_nodes, tmp_path_factory) -> tuple[Path, str, tuple[str, int]]:
    """The tiny pipeline on two Slurm nodes, whose node xlp-node2 loses its ranks (SIGKILL, as when a
    node goes down) after the first checkpoint: the job requeues itself and finishes. One run for the
    tests below (what two nodes run, what a requeue resumes, and that the weights are those of an
    uninterrupted run of the same world size on one machine). Returns (run dir, job log, final state)."""
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    proc = xlp("submit", str(TINY), "--to", "slurm", "--run-dir", str(run_dir), *TWO_NODES, check=True)
    job = job_id_of(proc.stdout)
    first_checkpoint = run_dir / "train" / "checkpoints" / "step_00000020"
    deadline = time.time() + 600
    while not (first_checkpoint / "meta.json").is_file():
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        assert slurm_state(job)[0] in ("PENDING", "RUNNING"), (run_dir / "submit" / f"slurm-{job}.out").read_text()
        time.sleep(0.5)
    victims = rank_pids_on("xlp-node2")
    assert victims, "no training rank found on xlp-node2"
    for pid in victims:  # the node's ranks die at once, as they do when a node goes down
        os.kill(pid, signal.SIGKILL)

    deadline = time.time() + 900
    while (state := slurm_state(job))[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() < deadline, f"job {job} still {state} after 15 minutes"
        time.sleep(2)
    return run_dir, (run_dir / "submit" / f"slurm-{job}.out").read_text(), state


def test_two_slurm_nodes_run_the_whole_pipeline(requeued):
    run_dir, log, state = requeued
    assert state[0] == "COMPLETED", log[-5000:]
    assert_pipeline_complete(run_dir)
    train = stage_json(run_dir, "train")["metrics"]
    assert train["world_size"] == 2 and train["nodes"] == NODES
    # the data stages' Ray tasks ran on both nodes: the manifest says which node wrote each shard
    manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
    assert manifest["nodes"] == NODES
    assert {s["node"] for s in manifest["shards"]} == set(NODES)
    srun = (run_dir / "train" / "logs" / "srun.log").read_text()  # the requeued job's srun: both nodes again
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun


def test_ranks_lost_on_a_node_requeue_the_job_and_resume_bitwise(requeued, uninterrupted_local):
    """The requeued job resumes from its checkpoint and ends with the weights of an uninterrupted run of
    the same world size, bit for bit, though that one ran on one machine by the local launcher: neither
    the requeue nor where srun placed the ranks changes a bit (Ray Train's placement is compared with
    the same run in test_ray_worker_lost_restarts_from_the_checkpoint_bitwise)."""
    run_dir, log, state = requeued
    assert state == ("COMPLETED", 1), log[-5000:]
    assert "rank 1 on node xlp-node2" in log and "requeueing (restart 1 of at most 3)" in log
    assert "(restart 1) on xlp-node1" in log  # the same job, requeued by itself, not a new submission
    assert_pipeline_complete(run_dir)
    train = stage_json(run_dir, "train")
    assert train["resumed"] and train["metrics"]["resumed_from_step"] >= 20
    assert train["metrics"]["nodes"] == NODES
    assert weights(run_dir) == weights(uninterrupted_local)


# ---------------------------------------------------------------------------------------------
# Ray: a head here and a worker node (xlp-ray1), conftest.py's ray_head

RAY_TWO_NODES = ["train.cpu_processes=2", "train.threads=1", "train.steps=60", "train.save_every=20",
                 "data.partition_bytes=100000", *QUICK_EVAL]  # two Ray Train workers, SPREAD: one per node


@pytest.fixture(scope="module")
def uninterrupted_local(tmp_path_factory) -> Path:
    """The same training as RAY_TWO_NODES and TWO_NODES (2 ranks of 1 thread), uninterrupted, by the
    local launcher on this machine: the reference both the Slurm and the Ray runs are compared with (they
    run in different pytest processes: made once, by the first that needs it, under a lock)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's folder, which every worker's folder is in
    run_dir = base / "uninterrupted-local"
    with open(base / "uninterrupted-local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stage_json_or_none(run_dir, "train").get("status") != "done":
            proc = subprocess.run([*XLP, "run", str(TINY), "--run-dir", str(run_dir), "--stages",
                                   "tokenizer,shard,train", *RAY_TWO_NODES], env=xlp_env(), capture_output=True,
                                  text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return run_dir


def stage_json_or_none(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "stage.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_ray_worker_lost_restarts_from_the_checkpoint_bitwise(ray_head, uninterrupted_local, tmp_path):
    """Ray Train restarts the ranks after one's process is killed (train.max_restarts), from the last
    checkpoint, and the weights are those of an uninterrupted run of 2 ranks by the local launcher (as
    the 2-node Slurm runs' are, test_ranks_lost_on_a_node_requeue_the_job_and_resume_bitwise): the same
    world size gives the same result whichever launcher started the ranks."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen([*XLP, "submit", str(TINY), "--to", "ray", "--address", ray_head, "--wait",
                            "--run-dir", str(run_dir), *RAY_TWO_NODES],
                           env=xlp_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_checkpoint = run_dir / "train" / "checkpoints" / "step_00000020"
        deadline = time.time() + 600
        while not (first_checkpoint / "meta.json").is_file():
            assert time.time() < deadline and job.poll() is None, "no checkpoint within 10 minutes"
            time.sleep(0.5)
        beats = [json.loads(p.read_text()) for p in (run_dir / "train" / "logs").glob("heartbeat_*.json")]
        victim = next(b for b in beats if b["node"] == "xlp-ray1")
        os.kill(victim["pid"], signal.SIGKILL)
        out, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-5000:]
    assert_pipeline_complete(run_dir)
    train = stage_json(run_dir, "train")["metrics"]
    assert train["resumed_from_step"] >= 20 and train["world_size"] == 2
    assert len(train["nodes"]) == 2 and "xlp-ray1" in train["nodes"]
    # rank 0 speaks for the ranks: the restarted group's part of its log follows the first attempt's
    assert "resumed from" in (run_dir / "train" / "logs" / "rank_0.log").read_text()
    assert weights(run_dir) == weights(uninterrupted_local)
