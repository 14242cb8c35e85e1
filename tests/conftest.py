from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at the first import of xlp.kernels.triton,
# whichever test module does it (torch.compile preloads the ops, tests/test_compile.py). On a machine
# without a GPU the kernels can only run interpreted: say so before any test imports them, so that the
# order the modules run in does not decide whether tests/test_kernels_triton.py can run its kernels.
# Every process the tests start (xlp, training ranks, Ray workers) can import the helpers in tests/
# (toy stages, fault hooks): tests/ goes on PYTHONPATH. The clone's root never does: its kernels/ folder
# would shadow Hugging Face's `kernels`; our packages are imported as xlp.* from the install.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(TESTS_DIR)])
os.environ["PYTHONSAFEPATH"] = "1"  # `python -m` in a test's subprocess: no working directory on sys.path

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

# The suite runs more busy processes than a small machine has cores (4 pytest workers, training ranks, Ray
# workers), and an OpenMP thread that waits for its peers spins by default (libgomp: up to 300,000 turns),
# on a core another process needs. PASSIVE: it sleeps instead. Every process the tests start inherits it;
# thread counts, and so results, are unchanged. Four concurrent runs of the model, kernel and compile tests
# on 2 cores: 180 CPU-s and 93 s spinning, 76 CPU-s and 41 s passive (README, Development).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# `make test` runs the suite in several processes (pytest-xdist); what decides where a test runs:
# - the machine-wide services are network namespaces with fixed names, one of each per machine: the
#   local Slurm cluster (nodes xlp-node1..2) and the 2-node Ray cluster (worker xlp-ray1). The Ray
#   cluster's tests run in one worker, one after another; the Slurm tests in two (the cluster queues
#   their jobs; infra/local-slurm.sh starts it once); these groups start first: they are the longest;
# - a module whose tests share a module-scoped fixture (a trained run, a built wheel) runs in one
#   worker, so the fixture is made once;
# - every other test goes wherever a worker is free.
# pytest-xdist's own `xdist_group` marks do not reach its scheduler under pytest 9.2 (the node id it
# rewrites is no longer the one pytest reports), so the workers write each test's group to a file as
# they collect, and the scheduler below (xdist's LoadScope with these groups as scopes) reads it.
SERVICE_GROUPS = {"slurm-nodes": {"slurm_two_nodes", "requeued"}, "slurm": {"slurm"}, "ray-cluster": {"ray_head"}}
# then the groups and tests that took longest (`make test PYTEST_ARGS=--durations=60`, 2026-12-07, at 73b8608:
# the Ray-job secrets test 237 s, the kill-after-the-last-checkpoint test 222 s), so that no long one starts last
LONG_FIRST = ("test_secrets.py", "test_continue", "test_wheel", "test_study", "test_export", "test_hang",
              "test_mixture.py", "test_small_data", "test_campaign.py", "test_fingerprint_inputs.py", "test_elastic",
              "test_ray_faults", "test_train")
GROUPS_FILE = "XLP_TEST_GROUPS_FILE"


def _group(item) -> str:
    names = set(getattr(item, "fixturenames", ()))
    for group, fixtures in SERVICE_GROUPS.items():
        if names & fixtures:
            return group
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        if any(d.scope == "module" for d in defs):
            return item.module.__name__
    return item.nodeid


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        if getattr(config.option, "numprocesses", None):
            os.environ[GROUPS_FILE] = tempfile.mkstemp(prefix="xlp-test-groups-", suffix=".json")[1]
        _start_shared_ray(config)


# One Ray for the whole session (tests/ray_service.py), started here, in the process that starts the
# test workers, so that they inherit its address in RAY_ADDRESS: every `xlp run` a test starts, and every
# pipeline a test runs in its own process, connects to it (the runner passes the driver's XLP_*, WANDB_*,
# ... variables to the stage tasks, as on any cluster). Its workers run in a folder of their own, not in
# the test's working directory: a stage that depends on its task's working directory fails here.
_shared_ray: dict = {}
SHARED_RAY_TEMP_DIR = "XLP_TEST_RAY_TEMP_DIR"


def _start_shared_ray(config) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cwd = tempfile.mkdtemp(prefix="xlp-test-ray-")
    temp = tempfile.mkdtemp(prefix="xtr", dir="/tmp")  # short: Ray's socket paths (at most 107 bytes)
    proc = subprocess.Popen([sys.executable, str(TESTS_DIR / "ray_service.py"), str(os.cpu_count() or 2), temp],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    address, _, auth_mode = proc.stdout.readline().strip().partition(" ")
    if proc.poll() is not None or not address:
        proc.kill()
        raise pytest.UsageError(f"the tests' shared Ray did not start (tests/ray_service.py, exit {proc.wait()})")
    _shared_ray.update(proc=proc, cwd=cwd, temp=temp)
    os.environ["RAY_ADDRESS"] = address
    os.environ[SHARED_RAY_TEMP_DIR] = temp  # its logs, for the tests that search them
    if auth_mode:
        os.environ["RAY_AUTH_MODE"] = auth_mode
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_unconfigure(config):
    _ray_cluster.stop()
    proc = _shared_ray.pop("proc", None)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a stuck shutdown must not hang the session's end
            proc.kill()
        shutil.rmtree(_shared_ray.pop("cwd"), ignore_errors=True)
        shutil.rmtree(_shared_ray.pop("temp"), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    groups = {item.nodeid: _group(item) for item in items}
    def rank(item) -> int:
        group = groups[item.nodeid]
        if group in SERVICE_GROUPS:
            return 0
        name = item.nodeid.split("/")[-1]
        return next((1 + i for i, prefix in enumerate(LONG_FIRST) if name.startswith(prefix)), 1 + len(LONG_FIRST))

    items.sort(key=rank)  # stable: within a rank, the collection order
    path = os.environ.get(GROUPS_FILE)
    if path and os.environ.get("PYTEST_XDIST_WORKER") is not None:
        tmp = f"{path}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(groups))
        os.replace(tmp, path)  # every worker collects the same tests: the last one written is as good


if importlib.util.find_spec("xdist") is not None:
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's LoadScope: each scope goes to one worker whole; the scopes are our groups."""

        _groups: dict | None = None

        def _reschedule(self, node) -> None:
            """More work for a worker only when it is on its last test (xdist's LoadScope gives it more
            with two left): a long group is not queued behind another worker's long test."""
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                self._groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text())
            return self._groups.get(nodeid, nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if os.environ.get(GROUPS_FILE):
            config.option.loadscopereorder = False  # our order: the service groups first
            return GroupScheduling(config, log)
        return None


@pytest.fixture(scope="session")
def ray_local():
    """This process connected to the session's shared Ray (its workers can import modules from tests/)."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


class _RayCluster:
    """The 2-node Ray cluster of `ray_head`: started by the first test that asks for it, stopped once the
    last of the tests that use it in a row has run (they run in one process, one after another: see
    SERVICE_GROUPS), so that it does not idle through the rest of the session (about 5% of a core);
    a test that asks for it later starts it again."""

    def __init__(self) -> None:
        self.env: dict | None = None
        self.address: str | None = None

    def start(self) -> str:
        import subprocess

        from xlp.pipeline.train.dist import free_port

        if self.address is not None:
            return self.address
        port, dash = free_port(), free_port()
        # a short path: Ray's socket files live under it (at most 107 bytes; pytest's tmp paths are longer)
        temp = tempfile.mkdtemp(prefix="xrh", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's shared Ray
        env.update(RAY_PORT=str(port), RAY_DASHBOARD_PORT=str(dash), RAY_NUM_CPUS="2", RAY_TEMP_DIR=temp)
        self.env = env  # stopped even when it failed to come up whole
        proc = subprocess.run(["bash", str(REPO / "infra" / "local-ray.sh"), "--workers", "1"], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            self.stop()
            raise AssertionError(f"infra/local-ray.sh --workers 1 failed:\n{proc.stdout}{proc.stderr}")
        self.address = f"http://127.0.0.1:{dash}"
        return self.address

    def stop(self) -> None:
        import subprocess

        if self.env is None:
            return
        subprocess.run(["bash", str(REPO / "infra" / "local-ray.sh"), "stop"], env=self.env, capture_output=True,
                       timeout=120)
        shutil.rmtree(self.env["RAY_TEMP_DIR"], ignore_errors=True)
        self.env = self.address = None


_ray_cluster = _RayCluster()


@pytest.fixture
def ray_head():
    """A real Ray cluster of two nodes for `xlp submit --to ray`: a head with the Jobs API and token
    authentication on this machine, and one worker node (xlp-ray1, a network namespace of its own;
    infra/local-ray.sh --workers 1). Yields the Jobs API address; shared by the tests that use it in a
    row (_RayCluster)."""
    yield _ray_cluster.start()


def pytest_runtest_teardown(item, nextitem):
    uses = lambda it: it is not None and "ray_head" in getattr(it, "fixturenames", ())  # noqa: E731
    if uses(item) and not uses(nextitem):
        _ray_cluster.stop()


def xlp_env(extra: dict | None = None, *, embedded_ray: bool = False) -> dict:
    """Environment for `xlp` subprocesses: tests/ importable (toy stages), W&B offline; the session's
    shared Ray, or with `embedded_ray` none: `xlp run` starts its own (a test that breaks its Ray, or
    reads its logs or temp dir)."""
    env = dict(os.environ)
    if embedded_ray:
        env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


XLP = [sys.executable, "-m", "xlp.pipeline.cli"]


def fill_disk(path: Path) -> None:
    """Write `path` until its file system is full to the last byte (ENOSPC, as a real full disk gives)."""
    import errno

    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
