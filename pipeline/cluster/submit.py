"""`xlp submit`: send the run that `xlp run` would do here to a Slurm or Ray cluster.

The config is validated and resolved here, before anything is queued, and saved into the run
directory, which must be on a filesystem the cluster's nodes share (so are `xlp status` and the
outputs). On the cluster, the job runs `xlp run` on that saved config.

Before anything is queued, `--to slurm` also checks:
- that slurm.* and train.* agree (pipeline/cluster/plan.py: e.g. train.device=cpu with slurm.gpus_per_node>0,
  fewer CPUs than ranks per node);
- the request against the partition, from `sinfo` (pipeline/cluster/slurm.py): nodes, CPUs, GPUs (gpu
  gres) and memory per node, the largest job and the time limit; then `sbatch --test-only` for what
  only Slurm knows (accounts, QOS, features). Slurm accepts some requests no node can hold and leaves
  them PENDING forever; these checks refuse them with the key to change and a value that fits.
  `--no-check` skips the cluster checks (not the config's).
`--wait` prints the job's state and pending reason whenever they change ("job 12: PENDING (Resources)",
"job 12: RUNNING on node1,node2"), streams its log, and fails at once, cancelling the job, on a pending
reason that means it can never start (PartitionConfig, PartitionNodeLimit, PartitionTimeLimit, ...).

`--dry-run` does all of that but queues nothing: it prints the sbatch script (Slurm) or the job's
entrypoint and runtime env (Ray), and the training launch plan for the allocation the config asks for
(slurm.nodes x slurm.gpus_per_node): the srun step's ranks, their GPU binding, rendezvous and
environment, or Ray Train's ScalingConfig.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from string import Template
from typing import NamedTuple, Optional, TextIO

from omegaconf import DictConfig, OmegaConf

from xlp.pipeline.cluster.launch import RankCommand
from xlp.pipeline.cluster.plan import (
    RayTrainPlan,
    planned_ray_cluster,
    planned_slurm_allocation,
    ray_train_plan,
    slurm_consistency_errors,
    srun_plan,
)
from xlp.pipeline.cluster.slurm import SlurmQueryError, never_starts, read_partition, request_errors
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.core.resources import sbatch_template
from xlp.pipeline.core.schema.names import control_characters
from xlp.pipeline.core.secrets import env_references, secret_keys
from xlp.pipeline.core.stage import atomic_write_text

SBATCH_TEMPLATE = sbatch_template()
TERMINAL_SLURM_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}



class SubmitError(RuntimeError):
    """The cluster refused the run or could not be reached; the message says what to fix."""


def submitted_config(cfg: DictConfig, run_dir: Path, launcher: str) -> tuple[Path, str]:
    """The resolved config the job will run and its path in RUN_DIR/submit/ (kept: one file per
    submission), with `train.launcher` set to the cluster's launcher (slurm or ray) where the config
    leaves it to auto.

    No secret is written: a value that came from a secret environment variable (or from one holding a
    credentialed URL, see pipeline/core/secrets.py) is saved as `${oc.env:NAME}`, which the job resolves
    from its own environment (Slurm: the submitting shell's, exported; Ray: the cluster's). A credential
    written literally in the config cannot be submitted safely: that is an error naming the key."""
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
    return RunLayout(run_dir).submitted_config(stamp), OmegaConf.to_yaml(OmegaConf.create(data))


def run_args(config: Path, run_dir: Path, only: Optional[list[str]], force: bool) -> list[str]:
    args = ["run", str(config), "--run-dir", str(run_dir)]
    if only:
        args += ["--stages", ",".join(only)]
    if force:
        args.append("--force")
    return args


# ---------------------------------------------------------------------------------------------
# Slurm


def render_sbatch(cfg: DictConfig, *, config: Path, run_dir: Path, only: Optional[list[str]], force: bool,
                  after: Optional[str] = None) -> str:
    """`after`: a job id this job waits for (it starts once that job completed; never, if it failed)."""
    s = cfg.slurm
    optional = []
    if after:
        optional += [f"#SBATCH --dependency=afterok:{after}", "#SBATCH --kill-on-invalid-dep=yes"]
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
    # The config's values were checked when it was loaded (core/schema/names.py); these come from elsewhere
    # (--run-dir, the directory xlp submit runs in): a line break in one would end its line of the script.
    for what, value in (("the run directory (--run-dir or run.dir)", run_dir), ("the job's config file", config),
                        ("the working directory xlp submit runs in", os.getcwd()), ("slurm.python", python)):
        bad = control_characters(str(value))
        if bad:
            raise SubmitError(f"{what} {str(value)!r} holds the control character(s) {', '.join(bad)}, which would "
                              "break the sbatch script; use a path without them")
    values = {
        "job_name": s.job_name or f"xlp-{cfg.run.name}",
        "nodes": s.nodes,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time,
        "signal_seconds": s.signal_seconds,
        "optional_lines": "\n".join(optional),
        "workdir": shlex.quote(os.getcwd()),  # relative paths in the config mean what they meant here
        "run_dir": shlex.quote(str(run_dir)),
        "slurm_log": sbatch_quote(str(layout.slurm_log("%j"))),  # sbatch fills in %j
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
    script = Template(SBATCH_TEMPLATE.read_text()).substitute(values)
    late = late_sbatch_lines(script)
    if late:  # sbatch would ignore them: a job without the time limit, log or requeue asked for
        raise SubmitError(f"the rendered sbatch script has #SBATCH lines after its first command ({late[0]!r}): "
                          "sbatch would ignore them; this is a bug in xlp: please report it with the config")
    return script


def sbatch_quote(text: str) -> str:
    """`text` as one argument of an #SBATCH line: sbatch splits those lines at spaces and reads quotes and
    backslashes as the shell does (and backslashes inside quotes too), and an unquoted '#' starts a comment."""
    if re.fullmatch(r"[A-Za-z0-9_./%+=:,@-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def late_sbatch_lines(script: str) -> list[str]:
    """The #SBATCH lines of `script` that come after its first command: sbatch stops reading options
    there, so these are silently ignored."""
    seen_command = False
    late = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if seen_command and line.startswith("#SBATCH"):
            late.append(line)
        elif stripped and not stripped.startswith("#"):
            seen_command = True
    return late


def submit_slurm(cfg: DictConfig, *, run_dir: Path, only: Optional[list[str]], force: bool, wait: bool,
                 out: TextIO, dry_run: bool = False, check: bool = True, after: Optional[str] = None,
                 queued: Optional[list[str]] = None) -> int:
    """Check, render and queue the run as a Slurm batch job (with `dry_run`: check and print, queue
    nothing). Returns the exit status for `xlp submit`; raises SubmitError with what to change.
    `after`: a job id to wait for (`xlp study`: a variant's job waits for its data stages' job);
    `queued`: the job's id is appended to it."""
    errors = slurm_consistency_errors(cfg)
    if errors:
        raise SubmitError("; ".join(errors))
    config, config_text = submitted_config(cfg, run_dir, "slurm")
    script = render_sbatch(cfg, config=config, run_dir=run_dir, only=only, force=force, after=after)
    script_path = config.with_suffix(".sbatch")
    if dry_run:
        print_slurm_dry_run(cfg, OmegaConf.create(config_text), script=script, script_path=script_path,
                            run_dir=run_dir, out=out)
    have_slurm = shutil.which("sbatch") is not None
    if not have_slurm and not dry_run:
        raise SubmitError("sbatch not found: run `xlp submit --to slurm` on a Slurm login node "
                          "(or start a local Slurm with infra/local-slurm.sh)")
    if check and have_slurm:
        # sbatch --test-only cannot check a dependency on a job that is not queued yet (a dry run's)
        partition = check_slurm_request(cfg, script if not (dry_run and after) else
                                        render_sbatch(cfg, config=config, run_dir=run_dir, only=only, force=force))
        down = partition.unavailable_nodes()
        if down and len(down) > len(partition.nodes) - int(cfg.slurm.nodes):
            print(f"note: {len(down)} of the {len(partition.nodes)} nodes of partition {partition.name} are "
                  f"unavailable now ({', '.join(f'{n.name} {n.state}' for n in down)}): the job waits until "
                  "enough of them are back", file=out, flush=True)
        if dry_run:
            print(f"\n== checks: the request fits partition {partition.name} ({len(partition.nodes)} node(s)); "
                  "sbatch --test-only accepts it", file=out)
    elif dry_run:
        print("\n== checks: not run (" + ("--no-check" if have_slurm else "no Slurm here: sbatch not found") + ")",
              file=out)
    if dry_run:
        print("\nnothing was queued (--dry-run)", file=out, flush=True)
        return 0

    atomic_write_text(config, config_text)
    atomic_write_text(script_path, script)
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())
        raise SubmitError(f"sbatch refused {script_path}: {said}{_partition_hint(cfg)}")
    job_id = proc.stdout.strip().split(";")[0]
    if queued is not None:
        queued.append(job_id)
    log = RunLayout(run_dir).slurm_log(job_id)
    print(f"submitted Slurm job {job_id}\n  script: {script_path}\n  log:    {log}\n"
          f"  follow: xlp status {run_dir}   |   tail -f {log}", file=out, flush=True)
    if not wait:
        return 0
    return wait_slurm(job_id, log, out, slurm=cfg.slurm)


def _partition_hint(cfg: DictConfig) -> str:
    """"; slurm.x=... but ...: set slurm.x=..." when the partition shows what in slurm.* does not fit."""
    try:
        errors = request_errors(cfg.slurm, read_partition(cfg.slurm.partition or None))
    except (SlurmQueryError, ValueError):
        return ""
    return "; " + "; ".join(errors) if errors else ""


def check_slurm_request(cfg: DictConfig, script: str):
    """The partition the job would run in, after checking that its nodes can hold the request (sinfo)
    and that `sbatch --test-only` accepts the script; SubmitError naming the keys otherwise."""
    try:
        partition = read_partition(cfg.slurm.partition or None)
    except SlurmQueryError as e:
        raise SubmitError(str(e)) from None
    errors = request_errors(cfg.slurm, partition)
    if errors:
        raise SubmitError("; ".join(errors) + " (--no-check submits it anyway)")
    # What sinfo does not show (accounts, QOS, features, reservations): Slurm's own verdict, on the
    # script from stdin so that nothing is written for a refused submission.
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=120)
    said = " ".join((proc.stderr + proc.stdout).split())
    if proc.returncode != 0:
        raise SubmitError(f"Slurm would not run this job on partition {partition.name}: `sbatch --test-only` says "
                          f"{said!r}; check slurm.partition, slurm.account and slurm.extra (--no-check submits it anyway)")
    return partition


def print_slurm_dry_run(cfg: DictConfig, job_cfg: DictConfig, *, script: str, script_path: Path, run_dir: Path,
                        out: TextIO) -> None:
    """The sbatch script and the training launch plan on the allocation it asks for."""
    s = cfg.slurm
    kind = f"{s.gpus_per_node} GPUs" if s.gpus_per_node else f"no GPUs, {cfg.train.cpu_processes} CPU ranks"
    print(f"xlp submit --to slurm --dry-run: run {cfg.run.name} in {run_dir}\n"
          f"config: valid; the job's copy would be {script_path.with_suffix('.yaml')}\n"
          f"\n== sbatch script ({script_path})\n{script.rstrip()}\n"
          f"\n== training launch (train.launcher={job_cfg.train.launcher}) on the allocation asked for: "
          f"{s.nodes} node(s) x {kind}, {s.cpus_per_task} CPUs per node\n{launch_plan_text(job_cfg, run_dir)}",
          file=out, flush=True)


def launch_plan_text(job_cfg: DictConfig, run_dir: Path) -> str:
    """What the train stage would start on the allocation or cluster of `slurm.*` (see launch_plan)."""
    plan = launch_plan(job_cfg)
    if isinstance(plan, RayTrainPlan):
        return plan.describe()
    if isinstance(plan, str):
        return plan

    layout = RunLayout(run_dir)
    command = RankCommand(run_dir, layout.config, layout.train, layout.shard_dir)
    if not plan.gpus_per_node:
        command.on_cpu()
    return plan.describe(command.argv(), log_pattern=f"{layout.train.logs}/rank_%t.log")


def launch_plan(job_cfg: DictConfig):
    """The plan (pipeline/cluster/plan.py) of the train stage for the launcher `job_cfg` sets, on the
    allocation `slurm.*` asks for: an SrunPlan (slurm), a RayTrainPlan (ray), or a line (local)."""
    t = job_cfg.train
    user_env = {str(k): str(v) for k, v in t.env.items()}
    common = dict(cpu_processes=int(t.cpu_processes), threads=int(t.threads), device=str(t.device),
                  user_env=user_env, inherited_env=os.environ, sequence_parallel=int(t.sequence_parallel))
    if t.launcher == "ray":
        return ray_train_plan(planned_ray_cluster(job_cfg.slurm), **common)
    if t.launcher in ("slurm", "auto"):
        return srun_plan(planned_slurm_allocation(job_cfg.slurm), **common)
    ranks = (0 if t.device == "cpu" else job_cfg.slurm.gpus_per_node) or t.cpu_processes
    return f"{ranks} local processes on the job's first node (train.launcher=local)"


class SlurmJob(NamedTuple):
    state: str  # PENDING, RUNNING, COMPLETED, ...; UNKNOWN once the controller has forgotten the job
    reason: str  # why it is pending ("Resources", "PartitionConfig", ...); "None" when it is not
    nodes: str  # its node list (compressed: node[1-2]); empty while pending
    partition: str
    exit_code: str


def slurm_job(job_id: str) -> SlurmJob:
    """The job as scontrol shows it."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return SlurmJob("UNKNOWN", "", "", "", "")
    fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
    nodes = fields.get("NodeList", "")
    return SlurmJob(fields.get("JobState", "UNKNOWN"),
                    fields.get("Reason", "None").replace("_", " "),  # scontrol -o joins a reason's words with _
                    "" if nodes == "(null)" else nodes, fields.get("Partition", ""), fields.get("ExitCode", ""))


def _hostnames(nodelist: str) -> str:
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    return ",".join(proc.stdout.split()) if proc.returncode == 0 and proc.stdout.strip() else nodelist


def job_line(job_id: str, job: SlurmJob) -> str:
    """"job 12: PENDING (Resources)", "job 12: RUNNING on node1,node2"."""
    line = f"job {job_id}: {job.state}"
    if job.reason and job.reason != "None":
        line += f" ({job.reason})"
    if job.nodes and job.state != "PENDING":
        line += f" on {_hostnames(job.nodes)}"
    return line


def wait_slurm(job_id: str, log: Path, out: TextIO, poll_s: float = 2.0, slurm=None) -> int:
    """Follow the job to its end: its state and pending reason when they change, its log as it grows.
    A pending reason that means it will never start cancels it and raises SubmitError saying why
    (`slurm`: the job's slurm.* config, to name the key to change)."""
    pos = 0
    shown = None
    while True:
        job = slurm_job(job_id)
        ended = job.state in TERMINAL_SLURM_STATES or job.state == "UNKNOWN"
        if (job.state, job.reason, job.nodes) != shown and not ended:  # the last line says how it ended
            shown = (job.state, job.reason, job.nodes)
            print(job_line(job_id, job), file=out, flush=True)
        pos = _copy_new(log, pos, out)
        if job.state == "PENDING":
            why = _never_starts(job, slurm)
            if why:
                subprocess.run(["scancel", job_id], capture_output=True)
                raise SubmitError(f"Slurm job {job_id} can never start on partition {job.partition} "
                                  f"(PENDING, reason {job.reason}); cancelled it. {why}")
        if ended:
            break
        time.sleep(poll_s)
    print(f"Slurm job {job_id}: {job.state} (exit code {job.exit_code or '?'})", file=out, flush=True)
    return 0 if job.state == "COMPLETED" else 1


def _copy_new(log: Path, pos: int, out: TextIO) -> int:
    """Write what `log` gained since `pos` to `out`; the new position."""
    if not log.exists():
        return pos
    with open(log, "rb") as f:
        f.seek(pos)
        chunk = f.read()
    out.write(chunk.decode(errors="replace"))
    out.flush()
    return pos + len(chunk)


def _never_starts(job: SlurmJob, slurm) -> Optional[str]:
    """What to change when `job`'s pending reason means it will never start; None when it may."""
    key = never_starts(job.reason)
    needs_nodes = job.reason.startswith("ReqNodeNotAvail")  # never only if the nodes it names do not exist
    if key is None and not needs_nodes:
        return None
    try:
        partition = read_partition(job.partition or None)
    except SlurmQueryError:
        partition = None
    if key is None and partition is not None:
        key = never_starts(job.reason, [n.name for n in partition.nodes])
    if key is None:
        return None
    if slurm is not None and partition is not None:
        errors = request_errors(slurm, partition)
        if errors:
            return "; ".join(errors)
    return f"Change {key} to what partition {job.partition} allows (`sinfo -p {job.partition} -N -l` lists its nodes)."


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
               force: bool, wait: bool, out: TextIO, dry_run: bool = False) -> int:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    config, config_text = submitted_config(cfg, run_dir, "ray")
    entrypoint = shlex.join([sys.executable, "-m", "xlp.pipeline.cli", *run_args(config, run_dir, only, force)])
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}}
    metadata = {"xlp_run_dir": str(run_dir), "xlp_run_name": str(cfg.run.name)}
    if dry_run:
        print_ray_dry_run(cfg, OmegaConf.create(config_text), address=address, config=config, entrypoint=entrypoint,
                          runtime_env=runtime_env, metadata=metadata, run_dir=run_dir, out=out)
        return 0
    if not address:
        raise SubmitError("no Ray cluster given: pass --address http://HEAD:8265 (the Jobs API of the "
                          "head node; infra/local-ray.sh starts one here) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    os.environ.update(_ray_auth_env())
    # Ray's client takes RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, over the address it is given: a
    # RAY_ADDRESS naming another cluster (or a GCS address, not a Jobs API) would win over --address.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises several kinds; all mean "cannot use this cluster"
        raise SubmitError(_ray_error(address, e)) from None
    atomic_write_text(config, config_text)
    # A head that has just started answers before its job agent is up ("No available agent to submit
    # job, please try again later"): that one error is retried for a minute; any other fails at once.
    deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
            break
        except Exception as e:  # noqa: BLE001
            if "no available agent" not in str(e).lower() or time.monotonic() > deadline:
                raise SubmitError(_ray_error(address, e)) from None
            print(f"the Ray cluster at {address} has no job agent up yet; retrying", file=out, flush=True)
            time.sleep(2)
    print(f"submitted Ray job {job_id} to {address}\n  follow: ray job logs --follow {job_id}   |   "
          f"xlp status {run_dir}", file=out, flush=True)
    if not wait:
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(stream())
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1)
    print(f"Ray job {job_id}: {status.value}", file=out, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def print_ray_dry_run(cfg: DictConfig, job_cfg: DictConfig, *, address: Optional[str], config: Path,
                      entrypoint: str, runtime_env: dict, metadata: dict, run_dir: Path, out: TextIO) -> None:
    """The Ray job as it would be submitted, and the training launch plan on a cluster of the shape
    `slurm.*` describes (the real cluster's resources decide when the job runs)."""
    s = cfg.slurm
    shape = f"{s.nodes} node(s) x {s.gpus_per_node} GPUs, {s.cpus_per_task} CPUs per node"
    print(f"xlp submit --to ray --dry-run: run {cfg.run.name} in {run_dir}\n"
          f"config: valid; the job's copy would be {config}\n"
          f"\n== Ray job (to {address or '<no --address given>'}; not contacted)\n"
          f"entrypoint: {entrypoint}\nruntime_env: {json.dumps(runtime_env)}\nmetadata: {json.dumps(metadata)}\n"
          f"\n== training launch (train.launcher={job_cfg.train.launcher}) on a cluster of the shape slurm.* "
          f"describes ({shape}; the real cluster's resources decide at launch)\n{launch_plan_text(job_cfg, run_dir)}\n"
          "\nnothing was submitted (--dry-run)", file=out, flush=True)


def _ray_error(address: str, e: Exception) -> str:
    text = str(e)
    if "authentication" in text.lower() or "unauthorized" in text.lower():
        return (f"the Ray cluster at {address} requires its authentication token: copy it from the head "
                "node (`ray get-auth-token` there) into ~/.ray/auth_token or the RAY_AUTH_TOKEN variable, "
                "and set RAY_AUTH_MODE=token")
    return f"cannot submit to the Ray cluster at {address}: {text.splitlines()[0] if text else type(e).__name__}"
