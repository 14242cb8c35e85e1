"""A private Ray head started by infra/local-ray.sh (no worker namespaces: none of the 2-node cluster's fixed
names), with a home directory of its own: the token it writes is its owner's only and its `ray start` log
is its own. A second raylet joins it as a node of its own, and is killed, every process at once, while a
stage's task runs there: `xlp run` reports the cluster's fault (exit 75, the sbatch script requeues the job)
and the rerun resumes, the done stage kept (issue 29, items 4 and 11)."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, xlp_env
from xlp.pipeline.core.config import load_config
from xlp.pipeline.runner import stage_states
from toy_stages import FAR_STAGES

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
SCRIPT = str(REPO / "infra" / "local-ray.sh")
# Ray's failure detection, quicker than its defaults: a node is declared dead after 5 failed health checks
# 1 s apart (a raylet that is merely slow on this busy machine still has 3 s to answer each), and the owner
# of a lost task waits up to 20 s to hear why, so that it says NodeDiedError, as on a real cluster,
# rather than WorkerCrashedError (which counts the same)
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                  "RAY_health_check_failure_threshold": "5", "RAY_timeout_ms_task_wait_for_death_info": "20000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def private_head():
    """(env, gcs address, temp dir, home, the script's output) of a head on free ports, in a short temp dir of
    its own (Ray's socket paths are at most 107 bytes), HOME a fresh directory (its ~/.ray/auth_token)."""
    temp = Path(tempfile.mkdtemp(prefix="xrf", dir="/tmp"))
    home = temp / "home"
    home.mkdir()
    head_temp = temp / "head"  # the script creates it
    port = free_port()
    env = xlp_env({"HOME": str(home), "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(free_port()),
                   "RAY_NUM_CPUS": "1", "RAY_TEMP_DIR": str(head_temp), **FAST_DETECTION})
    try:
        proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield env, f"127.0.0.1:{port}", head_temp, home, proc.stdout
    finally:  # SIGKILL: nothing there to save (`local-ray.sh stop` waits up to 10 s for SIGTERM)
        kill_processes_of(temp, "ray.util.client.server", f":{port} ")
        subprocess.run(["rm", "-rf", str(temp)], timeout=60)


def processes_of(directory: Path, *also: str) -> list[int]:
    """Pids of a Ray node's processes: those whose command line names `directory` (its temp dir: the
    raylet, its agents) or holds all of `also` (the head's client server names only its address), and
    every process they started (its workers)."""
    parent, cmdline = {}, {}
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                parent[int(proc_dir.name)] = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline[int(proc_dir.name)] = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except (OSError, IndexError, ValueError):
                continue
    found = {pid for pid, line in cmdline.items()
             if pid != os.getpid() and (str(directory) in line or (also and all(a in line for a in also)))}
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        if not more:
            return sorted(found)
        found |= more


def kill_processes_of(directory: Path, *also: str) -> list[int]:
    pids = processes_of(directory, *also)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def test_local_ray_token_is_private_and_its_log_its_own(private_head):
    env, _, head_temp, home, said = private_head
    token = home / ".ray" / "auth_token"
    assert mode(token) == 0o600 and mode(token.parent) == 0o700  # was 0644 in a 0755 directory
    log = head_temp / "local-ray-start.log"  # was /tmp/local-ray-start.log, one for every head on the machine
    assert f"log: {log}" in said and "Ray runtime started" in log.read_text()
    # a token an older start left readable by everyone is tightened (the head is up: nothing restarts)
    token.chmod(0o644)
    again = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Ray head already running" in again.stdout
    assert f"{token} was readable by other users; it is mode 0600 now" in again.stdout
    assert mode(token) == 0o600


DRIVER = textwrap.dedent(
    """
    import sys
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.core.node import EXIT_RETRYABLE
    from xlp.pipeline.runner import PipelineError, run_pipeline
    from toy_stages import FAR_STAGES
    try:
        run_pipeline(load_config(None, ["run.dir=" + sys.argv[1]]), stages=FAR_STAGES)
    except PipelineError as e:  # as `xlp run` maps it (pipeline/cli.py)
        print(f"retryable={e.retryable}: {e}", flush=True)
        sys.exit(EXIT_RETRYABLE if e.retryable else 1)
    """
)


def test_a_node_lost_under_a_stage_is_the_clusters_fault_and_the_rerun_resumes(private_head, tmp_path):
    env, address, head_temp, home, _ = private_head
    node_temp = head_temp.parent / "node2"
    node_temp.mkdir()
    # a second node: a raylet of its own (its own temp dir, free ports), joined to the head
    joined = subprocess.run([RAY, "start", "--address", address, "--num-cpus", "1", "--temp-dir", str(node_temp),
                             "--disable-usage-stats", *(f"--{flag}={free_port()}" for flag in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                 "runtime-env-agent-port"))],
                            env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "hold").touch()  # the stage's task waits on the second node while this exists
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
    started = run_dir / "far" / "started"
    try:
        deadline = time.time() + 180
        while not started.exists():
            assert driver.poll() is None, driver.stdout.read()
            assert time.time() < deadline, "the stage's task never started"
            time.sleep(0.2)
        time.sleep(0.5)  # the file is written: the task waits on the second node now
        pid, node = started.read_text().split()
        assert int(pid) in processes_of(node_temp), "the task did not run on the second node"
        assert kill_processes_of(node_temp)  # the node is lost: its raylet, agents and workers at once
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_processes_of(node_temp)
    assert driver.returncode == 75, output
    assert "retryable=True: stage 'far' failed: RayNodeLost: the Ray cluster lost a node or a worker process the " \
           "stage used (NodeDiedError: " in output, output
    cfg = load_config(None, [f"run.dir={run_dir}"])
    assert {s.name: s.status for s in stage_states(FAR_STAGES, cfg, run_dir)} == {"numbers": "done", "far": "failed"}

    (run_dir / "hold").unlink()
    # The rerun (here on an embedded Ray: `xlp run` without RAY_ADDRESS; it writes the token of a fresh
    # HOME, 0600) skips the done stage and resumes the lost one.
    fresh_home = tmp_path / "home"
    fresh_home.mkdir()
    rerun = subprocess.run([sys.executable, "-c", DRIVER, str(run_dir)], capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in {**env, "HOME": str(fresh_home)}.items() if k != "RAY_ADDRESS"})
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "= numbers: done" in rerun.stdout and "> far: resuming" in rerun.stdout, rerun.stdout
    assert (run_dir / "calls.txt").read_text().split("\n")[:-1] == ["numbers fresh", "far fresh", "far resumed"]
    assert mode(fresh_home / ".ray" / "auth_token") == 0o600
