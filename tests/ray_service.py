"""The test session's shared Ray: started once by the pytest process that runs (or hands out) the tests,
used by every `xlp run` the tests start (RAY_ADDRESS), stopped at the end of the session.

    python tests/ray_service.py NUM_CPUS TEMP_DIR   prints the address and RAY_AUTH_MODE, then holds
                                                   the instance (its files in TEMP_DIR) until SIGTERM or
                                                   SIGINT, or until the process that started it ends

An embedded Ray per `xlp run` costs about 5 CPU-seconds to start and 5% of a core while it lives (seven
processes); the suite starts about fifty: shared, they cost that once. A test that needs a Ray of its own
(one it breaks, its temp dir, its start failing) drops RAY_ADDRESS (conftest.xlp_env(embedded_ray=True)).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import ray


def main() -> None:
    # No log monitor (`ray start --include-log-monitor=false`, which ray.init cannot ask for): it forwards
    # workers' output to drivers that want it, and none of the suite's does (log_to_driver=False: stage
    # output goes to the stage logs); it rescans the session's log files all session long (22 CPU-s of a
    # 17-minute suite, measured with process accounting).
    ray._private.node.Node.start_log_monitor = lambda self: None
    ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _temp_dir=sys.argv[2])
    # how a driver connects: the address, and the authentication mode ray.init chose (a driver without
    # RAY_AUTH_MODE=token is refused by a Ray with token authentication; the token is ~/.ray/auth_token)
    print(ray.get_runtime_context().gcs_address, os.environ.get("RAY_AUTH_MODE", ""), flush=True)
    # after ray.init, which installs a SIGTERM handler of its own (not a signal mask: Ray's processes,
    # its workers and what they start would inherit it)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(1.0) and os.getppid() == parent:  # nor outlive the session that started it
        pass
    ray.shutdown()


if __name__ == "__main__":
    main()
