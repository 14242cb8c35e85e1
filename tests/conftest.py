from __future__ import annotations

import os
import sys
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


# The machine-wide services: the local Slurm cluster (nodes xlp-node1..2) and the 2-node Ray cluster
# (worker xlp-ray1) are network namespaces with fixed names and addresses, one of each per machine.
# Under pytest-xdist (`make test` runs the suite in several processes) the tests that use them run in
# one worker, one after another (an xdist_group), and the other tests spread over the other workers.
CLUSTER_FIXTURES = frozenset({"slurm", "slurm_two_nodes", "uninterrupted", "ray_head"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("cluster"))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the tests in this process; workers can import modules from tests/."""
    import logging

    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray cluster of two nodes for `xlp submit --to ray`: a head with the Jobs API and token
    authentication on this machine, and one worker node (xlp-ray1, a network namespace of its own;
    infra/local-ray.sh --workers 1). Yields the Jobs API address; stopped at the end of the session."""
    import socket
    import subprocess

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_PORT=str(port), RAY_DASHBOARD_PORT=str(dash), RAY_NUM_CPUS="2",
               RAY_TEMP_DIR=str(tmp_path_factory.mktemp("ray")))
    script = str(REPO / "infra" / "local-ray.sh")
    proc = subprocess.run(["bash", script, "--workers", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield f"http://127.0.0.1:{dash}"
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def xlp_env(extra: dict | None = None) -> dict:
    """Environment for `xlp` subprocesses: tests/ importable (toy stages), W&B offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


XLP = [sys.executable, "-m", "xlp.pipeline.cli"]
