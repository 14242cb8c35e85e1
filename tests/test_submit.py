"""`xlp submit` against real services started on this machine: a single-node Slurm
(infra/local-slurm.sh: munge, slurmctld, slurmd) and a Ray head with the Jobs API and token
authentication (infra/local-ray.sh)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.train.checkpoint import complete_checkpoints

TINY = REPO / "configs" / "tiny.yaml"
# the cluster tests check where and how the stages ran, not what the eval measures (tests/test_eval.py
# does): their eval stage scores perplexity only, without the untrained baseline
QUICK_EVAL = ["eval.parts=[ppl]", "eval.baseline=false"]
ALL_STAGES = ["tokenizer", "shard", "train", "eval"]

can_run_slurm = shutil.which("sbatch") is not None or (os.geteuid() == 0 and shutil.which("apt-get") is not None)
pytestmark = pytest.mark.slow
needs_slurm = pytest.mark.skipif(not can_run_slurm, reason="needs Slurm, or root with apt-get to install it")


def xlp(*args, env=None, timeout=900, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run(XLP + list(args), env=env or xlp_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"xlp {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def stage_status(run_dir: Path) -> dict[str, str]:
    out = xlp("status", str(run_dir), "--json", check=True)
    return {name: s["status"] for name, s in json.loads(out.stdout).items()}


def assert_pipeline_complete(run_dir: Path) -> None:
    assert stage_status(run_dir) == {s: "done" for s in ALL_STAGES}
    model = run_dir / "train" / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert (run_dir / "eval" / "report.md").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture(scope="module")
def slurm():
    # the 2-node cluster tests/test_multinode.py uses too (one cluster shape: no restart between modules)
    proc = subprocess.run(["bash", str(REPO / "infra" / "local-slurm.sh"), "--nodes", "2"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield


@needs_slurm
def test_the_slurm_daemons_do_not_hold_the_start_lock(slurm):
    # a daemon that inherited infra/local-slurm.sh's lock held it for its lifetime: every later start
    # (another test module's, another checkout's) waited forever
    lock = Path("/run/lock/xlp-local-slurm.lock") if Path("/run/lock").is_dir() else Path("/tmp/xlp-local-slurm.lock")
    holders = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            comm = (proc_dir / "comm").read_text().strip()
            if comm in ("bash", "flock"):  # a start running now holds it, as it must
                continue
            if any(os.readlink(fd) == str(lock) for fd in (proc_dir / "fd").iterdir()):
                holders.append(f"{proc_dir.name} {comm}")
        except OSError:  # a process that ended meanwhile
            continue
    assert holders == []
    again = subprocess.run(["bash", str(REPO / "infra" / "local-slurm.sh"), "--nodes", "2"], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr


def slurm_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def job_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("submitted Slurm job "):
            return line.split()[3]
    raise AssertionError(f"no job id in:\n{output}")


@needs_slurm
def test_slurm_bad_config_fails_before_anything_is_queued(slurm, tmp_path):
    # a job name of its own: other tests queue jobs on this cluster meanwhile
    name = f"badconfig-{os.getpid()}-{int(time.time())}"
    proc = xlp("submit", str(TINY), "--to", "slurm", "train.stepz=3", f"run.name={name}",
               "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "unknown config key `train.stepz`" in proc.stderr
    assert jobs_named(f"xlp-{name}") == []
    assert not (tmp_path / "run").exists()


def default_partition() -> tuple[str, list[str], int]:
    """(name, node names, most CPUs on one node) of the default partition, as sinfo shows it now (the
    local cluster may have one node or several)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%c"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.split("|")[0].endswith("*")]
    assert rows, f"no default partition in:\n{out}"
    nodes = sorted({r[1] for r in rows})
    return rows[0][0].rstrip("*"), nodes, max(int(r[2]) for r in rows)


def jobs_named(name: str) -> list[str]:
    """Ids of the jobs called `name` the controller knows, in any state (finished ones for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


@needs_slurm
def test_slurm_precheck_refuses_what_the_partition_cannot_hold(slurm, tmp_path):
    partition, nodes, most_cpus = default_partition()
    # a job name of its own: other sessions queue jobs on this cluster meanwhile
    name = f"precheck-{os.getpid()}-{int(time.time())}"
    run_dir = tmp_path / "run"
    proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", f"slurm.cpus_per_task={most_cpus + 6}",
               f"run.name={name}", "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 1
    assert (f"slurm.cpus_per_task={most_cpus + 6} but the nodes of partition {partition} have at most {most_cpus} "
            f"CPUs: set slurm.cpus_per_task={most_cpus} (or less)") in proc.stderr, proc.stderr
    assert "sbatch refused" not in proc.stderr  # refused by the check, before sbatch saw it
    proc = xlp("submit", str(TINY), "--to", "slurm", f"slurm.nodes={len(nodes) + 1}", "slurm.cpus_per_task=1",
               "train.cpu_processes=1", f"run.name={name}", "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 1
    assert f"slurm.nodes={len(nodes) + 1} but partition {partition} has {len(nodes)} node(s)" in proc.stderr, proc.stderr
    assert jobs_named(f"xlp-{name}") == []
    assert not run_dir.exists()

    # --dry-run runs the same checks against the real partition, and queues nothing either
    proc = xlp("submit", str(TINY), "--to", "slurm", "--dry-run", "slurm.cpus_per_task=2", f"run.name={name}",
               "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"== checks: the request fits partition {partition} ({len(nodes)} node(s)); sbatch --test-only accepts it" \
        in proc.stdout
    assert "$ srun " in proc.stdout and "--ntasks-per-node=2" in proc.stdout
    assert jobs_named(f"xlp-{name}") == []
    assert not run_dir.exists()


@needs_slurm
def test_slurm_wait_fails_at_once_on_a_job_that_can_never_start(slurm, tmp_path):
    """sbatch accepts more nodes than the partition has (the job would pend forever with PartitionConfig):
    with the pre-check bypassed, --wait sees the reason, cancels the job and names the key."""
    partition, nodes, _ = default_partition()
    started = time.monotonic()
    proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", "--no-check", f"slurm.nodes={len(nodes) + 1}",
               "slurm.cpus_per_task=1", "train.cpu_processes=1", "--run-dir", str(tmp_path / "run"), timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job = job_id_of(proc.stdout)
    assert f"job {job}: PENDING (Partition" in proc.stdout  # the reason, as Slurm gave it
    assert f"Slurm job {job} can never start on partition {partition} (PENDING, reason Partition" in proc.stderr
    assert f"cancelled it. slurm.nodes={len(nodes) + 1} but partition {partition} has {len(nodes)} node(s): " \
           f"set slurm.nodes={len(nodes)}" in proc.stderr, proc.stderr
    assert took < 60, f"--wait took {took:.0f} s to give up"
    assert job not in slurm_jobs() or subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip() in ("", "CANCELLED")


@needs_slurm
def test_slurm_wait_shows_the_job_pending_then_running(slurm, tmp_path):
    """A short job (the tokenizer stage of the tiny config) held back by a dependency on another one,
    so that it is PENDING first whatever else the cluster runs."""
    _, nodes, _ = default_partition()
    blocker = subprocess.run(["sbatch", "--parsable", "--job-name=xlp-test-blocker", "--cpus-per-task=1",
                              "--output=/dev/null", "--wrap", "sleep 3"], capture_output=True, text=True, check=True)
    blocker_id = blocker.stdout.strip().split(";")[0]
    try:
        proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", "--stages", "tokenizer", "slurm.cpus_per_task=2",
                   f"slurm.extra=[--dependency=afterany:{blocker_id}]", "--run-dir", str(tmp_path / "run"), timeout=300)
    finally:
        subprocess.run(["scancel", blocker_id], capture_output=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    job = job_id_of(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"job {job}: ")]
    assert lines[0] == f"job {job}: PENDING (Dependency)", lines
    running = [line for line in lines if line.startswith(f"job {job}: RUNNING on ")]
    assert running and lines.index(running[0]) > 0, lines
    assert set(running[0].split(" on ", 1)[1].split(",")) <= set(nodes)
    assert proc.stdout.rstrip().endswith(f"Slurm job {job}: COMPLETED (exit code 0:0)")
    assert "+ tokenizer: done" in proc.stdout


@needs_slurm
def test_slurm_job_whose_ray_head_cannot_start_ends_as_a_cluster_fault(slurm, tmp_path):
    """`ray start --head` fails on the job's first node (its temp dir, RAY_TMPDIR from the submitting
    shell, is a file: a real failing start; on a loaded node it times out instead). The job starts the
    head again, at most 3 times in all, then ends with exit 75, a cluster fault that requeues up to
    slurm.max_requeues times (0 here), instead of waiting without end for a head that never comes."""
    not_a_dir = tmp_path / "ray-tmp-is-a-file"
    not_a_dir.write_text("")
    run_dir = tmp_path / "run"
    proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", "--stages", "tokenizer", "slurm.cpus_per_task=1",
               "train.cpu_processes=1", "slurm.max_requeues=0", "--run-dir", str(run_dir), env=xlp_env({"RAY_TMPDIR": str(not_a_dir)}),
               timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    job = job_id_of(proc.stdout)
    for attempt in (1, 2, 3):
        assert f"xlp job {job}: the Ray head did not come up on " in proc.stdout
        assert f"(attempt {attempt} of 3; its output: {run_dir / 'submit'}/ray-{job}.log)" in proc.stdout, proc.stdout
    assert f"xlp job {job}: pipeline exit status 75" in proc.stdout
    assert f"xlp job {job}: not requeued: it already restarted 0 times (slurm.max_requeues)" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"Slurm job {job}: FAILED (exit code 75:0)"), proc.stdout[-2000:]
    assert not (run_dir / "tokenizer").exists()  # no stage ran without its Ray cluster


# Run as a batch job: the srun plan from the job's own environment (as SlurmRanks builds it), carried out
# with a probe in place of the ranks; each probe says where it ran and what it was given.
PLAN_PROBE = """
import json, os, subprocess, sys
from pathlib import Path
from xlp.pipeline.cluster.launch import _SLURM_STEP_VARS, slurm_hosts
from xlp.pipeline.cluster.plan import SlurmAllocation, job_rendezvous_port, srun_plan

out = Path(sys.argv[1])
env = dict(os.environ)
hosts = slurm_hosts(env)
alloc = SlurmAllocation.from_env(env, first_node=hosts[0], gpus_per_node=0, cpus_fallback=1)
plan = srun_plan(alloc, cpu_processes=2, master_port=job_rendezvous_port(env["SLURM_JOB_ID"]),
                 user_env={"NCCL_DEBUG": "WARN"}, inherited_env=env)
for key in _SLURM_STEP_VARS:
    env.pop(key, None)
probe = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in ('SLURM_PROCID', 'SLURM_LOCALID', "
         "'SLURMD_NODENAME', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_SIZE', 'OMP_NUM_THREADS', 'NCCL_DEBUG')}))")
cmd = plan.srun_args(step_name="xlp-plan-probe", log_pattern=str(out / "rank_%t.log")) + [sys.executable, "-c", probe]
code = subprocess.run(cmd, env={**env, **plan.env}).returncode
(out / "plan.json").write_text(json.dumps({"hosts": hosts, "ranks": plan.ranks, "per_node": plan.ranks_per_node,
    "placement": [plan.placement(r) for r in range(plan.ranks)], "master": plan.master_addr,
    "port": plan.master_port, "threads": plan.env["OMP_NUM_THREADS"], "srun": code}))
"""


@needs_slurm
def test_slurm_srun_plan_places_the_ranks_where_it_says(slurm, tmp_path):
    """The plan's claims against the real srun, on every node the job gets (up to 2): rank r on node
    r // ranks_per_node with LOCAL_RANK r % ranks_per_node, the rendezvous on the first node, the plan's
    environment in every rank. --oversubscribe: the job shares CPUs with what the cluster runs already."""
    _, nodes, _ = default_partition()
    n = min(2, len(nodes))
    (tmp_path / "probe.py").write_text(PLAN_PROBE)
    proc = subprocess.run(["sbatch", "--parsable", "--job-name=xlp-test-plan-probe", f"--nodes={n}",
                           "--ntasks-per-node=1", "--cpus-per-task=2", "--oversubscribe", "--time=5",
                           f"--output={tmp_path}/job.out", f"--chdir={REPO}", "--wait",
                           f"--wrap={sys.executable} {tmp_path}/probe.py {tmp_path}"],
                          env=xlp_env(), capture_output=True, text=True, timeout=300)
    job_out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + job_out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["srun"] == 0 and plan["ranks"] == 2 * n and plan["per_node"] == 2, plan
    assert set(plan["hosts"]) <= set(nodes) and len(plan["hosts"]) == n
    for rank, (node, local, gpu) in enumerate(plan["placement"]):
        got = json.loads((tmp_path / f"rank_{rank}.log").read_text().strip().splitlines()[-1])
        assert got["SLURM_PROCID"] == str(rank)
        assert got["SLURMD_NODENAME"] == plan["hosts"][node], (rank, got, plan)
        assert got["SLURM_LOCALID"] == str(local) and gpu is None
        assert got["MASTER_ADDR"] == plan["hosts"][0] == plan["master"]
        assert got["MASTER_PORT"] == str(plan["port"])
        assert got["LOCAL_SIZE"] == "2" and got["OMP_NUM_THREADS"] == plan["threads"] == "1"
        assert got["NCCL_DEBUG"] == "WARN"


# long enough to be cancelled after its first checkpoint (step 10), short enough to finish soon after; with
# a W&B run (offline), which the resubmitted job continues
CANCELLED = ["slurm.cpus_per_task=2", "train.steps=80", "train.save_every=10", "wandb.mode=offline", *QUICK_EVAL]


@pytest.fixture(scope="module")
def resubmitted(slurm, tmp_path_factory) -> tuple[Path, int, subprocess.CompletedProcess]:
    """The tiny pipeline submitted to Slurm, its job cancelled (scancel) after the train stage's first
    checkpoint, then submitted again with --wait: one run for the tests below. Returns (run dir, the
    newest complete checkpoint's step when the job was cancelled, the second submission)."""
    run_dir = tmp_path_factory.mktemp("cancelled") / "run"
    proc = xlp("submit", str(TINY), "--to", "slurm", "--run-dir", str(run_dir), *CANCELLED, check=True)
    job = job_id_of(proc.stdout)
    checkpoints = run_dir / "train" / "checkpoints"
    deadline = time.time() + 600
    while not complete_checkpoints(checkpoints):
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        assert job in slurm_jobs(), (run_dir / "submit" / f"slurm-{job}.out").read_text()[-3000:]
        time.sleep(1)
    subprocess.run(["scancel", job], check=True)
    while job in slurm_jobs():
        time.sleep(1)
    assert stage_status(run_dir)["train"] in ("failed", "running")
    saved = complete_checkpoints(checkpoints)[-1][0]
    proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", "--run-dir", str(run_dir), *CANCELLED, timeout=1500)
    return run_dir, saved, proc


@needs_slurm
def test_slurm_cancelled_job_resubmitted_resumes_from_its_checkpoint(resubmitted):
    run_dir, saved, proc = resubmitted
    assert proc.returncode == 0, proc.stdout[-4000:]
    for stage in ("tokenizer", "shard"):
        assert f"= {stage}: done" in proc.stdout  # done stages skipped
    assert "> train: resuming" in proc.stdout
    resumed_at = int(proc.stdout.split("resumed from ", 1)[1].split("(step ", 1)[1].split(",")[0])
    assert resumed_at >= saved  # the step counter continues (SIGTERM may have saved a later one)
    assert_pipeline_complete(run_dir)
    # the W&B run too: the resubmitted job's rank 0 logged to the cancelled job's run id (one offline folder
    # per job, each named after the run id)
    run_id = (run_dir / "train" / "wandb_run_id").read_text().strip()
    folders = sorted((run_dir / "train" / "wandb").glob("offline-run-*"))
    assert len(folders) >= 2 and {f.name.rsplit("-", 1)[1] for f in folders} == {run_id}, folders


@needs_slurm
def test_slurm_runs_the_tiny_pipeline_then_reruns_one_stage(resubmitted):
    run_dir, _, proc = resubmitted
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Slurm job" in proc.stdout and "COMPLETED" in proc.stdout
    assert_pipeline_complete(run_dir)
    script = next((run_dir / "submit").glob("*.sbatch")).read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --cpus-per-task=2" in script
    # the train stage started its ranks as an srun step of the job, and rank 0's output reached the stage log
    assert "launch: srun, 2 ranks" in proc.stdout
    assert "--ntasks-per-node=2" in (run_dir / "train" / "logs" / "srun.log").read_text()
    assert (run_dir / "train" / "logs" / "rank_1.log").is_file()

    # --stages eval reruns just that stage on the cluster.
    proc = xlp("submit", str(TINY), "--to", "slurm", "--wait", "--run-dir", str(run_dir), *CANCELLED,
               "--stages", "eval", "--force")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "> eval: running" in proc.stdout
    for stage in ("tokenizer", "shard", "train"):
        assert f"> {stage}:" not in proc.stdout
    assert_pipeline_complete(run_dir)


# ---------------------------------------------------------------------------------------------
# Ray


# ray_head: the 2-node Ray cluster of conftest.py (shared with tests/test_multinode.py)


def test_ray_bad_config_fails_before_submitting(ray_head, tmp_path):
    proc = xlp("submit", str(TINY), "--to", "ray", "--address", ray_head, "train.steps=lots",
               "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 1 and "`train.steps`" in proc.stderr and "expected int" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_ray_without_token_says_what_to_set(ray_head, tmp_path):
    env = xlp_env()
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_MODE", None)
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
    proc = xlp("submit", str(TINY), "--to", "ray", "--address", ray_head, "--run-dir", str(tmp_path / "run"), env=env)
    assert proc.returncode == 1
    assert "RAY_AUTH_TOKEN" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr


def test_ray_job_runs_the_tiny_pipeline_on_two_nodes(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    proc = xlp("submit", str(TINY), "--to", "ray", "--address", ray_head, "--wait", "--run-dir", str(run_dir),
               "data.partition_bytes=100000", *QUICK_EVAL)  # several partitions: data tasks for both nodes
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout
    assert "launch: ray train, 2 workers" in proc.stdout  # the ranks ran as Ray Train workers
    assert (run_dir / "train" / "logs" / "rank_1.log").is_file()
    assert_pipeline_complete(run_dir)
    # the shard tasks and the two Ray Train workers were spread over both nodes
    manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
    assert len(manifest["nodes"]) == 2 and "xlp-ray1" in manifest["nodes"]
    train = json.loads((run_dir / "train" / "stage.json").read_text())["metrics"]
    assert train["world_size"] == 2 and train["nodes"] == manifest["nodes"]
