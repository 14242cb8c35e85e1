from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the tests in this process; workers can import modules from tests/."""
    import logging

    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def xlp_env(extra: dict | None = None) -> dict:
    """Environment for `xlp` subprocesses: tests/ importable (toy stages), W&B offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


XLP = [sys.executable, "-m", "pipeline.cli"]
