"""`xlp submit`: send the run that `xlp run` would do here to a Slurm or Ray cluster.

The config is validated and resolved here, before anything is queued, and saved into the run
directory, which must be on a filesystem the cluster's nodes share (so are `xlp status` and the
outputs). On the cluster, the job runs `xlp run` on that saved config.
"""
from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Optional, TextIO

from omegaconf import DictConfig, OmegaConf

from pipeline.layout import RunLayout
from pipeline.stage import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SBATCH_TEMPLATE = REPO_ROOT / "slurm" / "pipeline.sbatch"
TERMINAL_SLURM_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmConfig:
    """How `xlp submit --to slurm` asks for an allocation (rendered into slurm/pipeline.sbatch)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU ranks (train.cpu_processes per node)
    cpus_per_task: int = 8  # CPUs per node for the job's one task (Ray, data stages, CPU ranks)
    time: str = "24:00:00"
    job_name: Optional[str] = None  # None: xlp-<run.name>
    requeue: bool = True  # preempted or timed-out jobs go back to the queue and resume
    # times the job puts itself back in the queue after the cluster failed it (a rank's process or
    # node lost, a rank hung: `xlp run` exit status 75); 0: never
    max_requeues: int = 3
    signal_seconds: int = 300  # SIGTERM this long before the time limit, to save a checkpoint
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. ["--qos=high"]
    python: Optional[str] = None  # the Python on the nodes (None: the one running xlp submit)
    ray_port: int = 0  # the job's Ray head port; 0: a free one


class SubmitError(RuntimeError):
    """The cluster refused the run or could not be reached; the message says what to fix."""


def save_submitted_config(cfg: DictConfig, run_dir: Path, launcher: str) -> Path:
    """The resolved config the job will run, in RUN_DIR/submit/ (kept: one file per submission), with
    `train.launcher` set to the cluster's launcher (slurm or ray) where the config leaves it to auto.

    No secret is written: a value that came from a secret environment variable (or from one holding a
    credentialed URL, see pipeline/secrets.py) is saved as `${oc.env:NAME}`, which the job resolves
    from its own environment (Slurm: the submitting shell's, exported; Ray: the cluster's). A credential
    written literally in the config cannot be submitted safely: that is an error naming the key."""
    from pipeline.secrets import env_references, secret_keys

    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    if cfg.train.launcher == "auto":
        cfg.train.launcher = launcher
    data = env_references(OmegaConf.to_container(cfg, resolve=True))
    literal = secret_keys(data)
    if literal:
        raise SubmitError(
            f"config key(s) {', '.join(literal)} hold a credential (a user:password@ URL, a token query "
            "parameter or a secret's value) written in the config: xlp submit would save it in the run "
            "directory. Put it in an environment variable the job has (e.g. export SOURCE_URL=...) and "
            "write ${oc.env:SOURCE_URL} in the config instead")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RunLayout(run_dir).submitted_config(stamp)
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
    return path


def run_args(config: Path, run_dir: Path, only: Optional[list[str]], force: bool) -> list[str]:
    args = ["run", str(config), "--run-dir", str(run_dir)]
    if only:
        args += ["--stages", ",".join(only)]
    if force:
        args.append("--force")
    return args


# ---------------------------------------------------------------------------------------------
# Slurm


def render_sbatch(cfg: DictConfig, *, config: Path, run_dir: Path, only: Optional[list[str]], force: bool) -> str:
    s = cfg.slurm
    optional = []
    if s.partition:
        optional.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        optional.append(f"#SBATCH --account={s.account}")
    if s.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.requeue:
        optional.append("#SBATCH --requeue")
    for line in s.extra:
        optional.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
    python = s.python or sys.executable
    layout = RunLayout(run_dir)
    values = {
        "job_name": s.job_name or f"xlp-{cfg.run.name}",
        "nodes": s.nodes,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time,
        "signal_seconds": s.signal_seconds,
        "optional_lines": "\n".join(optional),
        "workdir": shlex.quote(str(REPO_ROOT)),
        "run_dir": shlex.quote(str(run_dir)),
        "slurm_log": shlex.quote(str(layout.slurm_log("%j"))),  # sbatch fills in %j
        # the shell fills in the job id: the directory quoted, the file name not
        "ray_log": f"{shlex.quote(str(layout.submit_dir))}/{layout.ray_log('$SLURM_JOB_ID').name}",
        "config": shlex.quote(str(config)),
        "python": shlex.quote(python),
        "ray": shlex.quote(str(Path(python).with_name("ray"))),
        "ray_port": s.ray_port,
        "max_requeues": s.max_requeues if s.requeue else 0,
        "stages": f"--stages {','.join(only)}" if only else "",
        "force": "--force" if force else "",
    }
    return Template(SBATCH_TEMPLATE.read_text()).substitute(values)


def submit_slurm(cfg: DictConfig, *, run_dir: Path, only: Optional[list[str]], force: bool, wait: bool,
                 out: TextIO) -> int:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run `xlp submit --to slurm` on a Slurm login node "
                          "(or start a local Slurm with infra/local-slurm.sh)")
    config = save_submitted_config(cfg, run_dir, "slurm")
    script = render_sbatch(cfg, config=config, run_dir=run_dir, only=only, force=force)
    script_path = config.with_suffix(".sbatch")
    atomic_write_text(script_path, script)
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    log = RunLayout(run_dir).slurm_log(job_id)
    print(f"submitted Slurm job {job_id}\n  script: {script_path}\n  log:    {log}\n"
          f"  follow: xlp status {run_dir}   |   tail -f {log}", file=out, flush=True)
    if not wait:
        return 0
    return wait_slurm(job_id, log, out)


def slurm_job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) from scontrol; ("UNKNOWN", "") once the controller has forgotten the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return "UNKNOWN", ""
    fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")


def wait_slurm(job_id: str, log: Path, out: TextIO, poll_s: float = 2.0) -> int:
    pos = 0
    state, exit_code = "PENDING", ""
    while True:
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if state in TERMINAL_SLURM_STATES or state == "UNKNOWN":
            break
        time.sleep(poll_s)
        state, exit_code = slurm_job_state(job_id)
    print(f"Slurm job {job_id}: {state} (exit code {exit_code or '?'})", file=out, flush=True)
    return 0 if state == "COMPLETED" else 1


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_auth_env() -> dict[str, str]:
    """RAY_AUTH_MODE=token when a token is at hand and the user has not chosen a mode."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def submit_ray(cfg: DictConfig, *, address: Optional[str], run_dir: Path, only: Optional[list[str]],
               force: bool, wait: bool, out: TextIO) -> int:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray cluster given: pass --address http://HEAD:8265 (the Jobs API of the "
                          "head node; infra/local-ray.sh starts one here) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    os.environ.update(_ray_auth_env())
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises several kinds; all mean "cannot use this cluster"
        raise SubmitError(_ray_error(address, e)) from None
    config = save_submitted_config(cfg, run_dir, "ray")
    entrypoint = shlex.join([sys.executable, "-m", "pipeline.cli", *run_args(config, run_dir, only, force)])
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1",
                                      "PYTHONPATH": str(REPO_ROOT)}},
            metadata={"xlp_run_dir": str(run_dir), "xlp_run_name": str(cfg.run.name)},
        )
    except Exception as e:  # noqa: BLE001
        raise SubmitError(_ray_error(address, e)) from None
    print(f"submitted Ray job {job_id} to {address}\n  follow: ray job logs --follow {job_id}   |   "
          f"xlp status {run_dir}", file=out, flush=True)
    if not wait:
        return 0
    import asyncio

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(stream())
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1)
    print(f"Ray job {job_id}: {status.value}", file=out, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _ray_error(address: str, e: Exception) -> str:
    text = str(e)
    if "authentication" in text.lower() or "unauthorized" in text.lower():
        return (f"the Ray cluster at {address} requires its authentication token: copy it from the head "
                "node (`ray get-auth-token` there) into ~/.ray/auth_token or the RAY_AUTH_TOKEN variable, "
                "and set RAY_AUTH_MODE=token")
    return f"cannot submit to the Ray cluster at {address}: {text.splitlines()[0] if text else type(e).__name__}"
