"""What the training launch will start, decided without starting anything.

The launchers (pipeline/cluster/launch.py) read the scheduler's view (Slurm's environment variables,
Ray's resources) and call these functions for the plan they then carry out; `xlp submit --dry-run`
calls the same functions with the allocation a config asks for (e.g. 2 nodes x 8 GPUs) and prints the
result, so GPU and multi-node settings that cannot run on this machine are still rendered and tested.

Ranks per node: one per GPU the job has on the node (with `xlp submit --to slurm`: slurm.gpus_per_node),
else train.cpu_processes gloo ranks (also with train.device=cpu). Under srun, rank r runs on node
r // ranks_per_node with LOCAL_RANK = r % ranks_per_node and drives cuda:LOCAL_RANK of its node (every
rank sees all of the node's GPUs, so NCCL can use peer-to-peer links between them); the rendezvous is
on the allocation's first node.

Sequence parallelism (train.sequence_parallel=N): a group is N consecutive ranks (pipeline/train/dist.py).
srun places ranks node by node, and Ray Train numbers its workers node by node, so every group is on one
node exactly when each node has a multiple of N ranks; the plans say whether that holds, and name the
groups that span nodes otherwise (their state exchange then crosses the network in every layer).

Environment of every rank, lowest priority first: the launching environment; the plan's defaults
(TORCH_NCCL_ASYNC_ERROR_HANDLING=1 on GPUs unless the environment sets it; DS_ACCELERATOR=cpu and
OMP_NUM_THREADS on CPU); `train.env` from the config.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

# On GPUs: a rank that fails makes its peers' pending NCCL collectives raise instead of hanging until
# the job's time limit, so the launch fails (and a Slurm job can requeue) at once.
NCCL_DEFAULTS = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def slurm_count(value: Optional[str]) -> Optional[int]:
    """A per-node count from a Slurm variable: "8", "8(x2)" or "8(x2),4" (the first node's); None when
    unset or unreadable."""
    try:
        return int(str(value).split("(")[0].split(",")[0])
    except (TypeError, ValueError):
        return None


def job_rendezvous_port(job_id: str) -> int:
    """The port every node of a job agrees on without talking (as pipeline/train/dist.py does): one the
    job's id picks, so two jobs sharing a first node rarely collide."""
    return 20000 + (int(job_id) * 7 + 13) % 20000


def _rank_defaults(inherited_env: Mapping[str, str], *, gpus: bool, cpu_threads: Optional[int]) -> dict[str, str]:
    if gpus:
        return {k: v for k, v in NCCL_DEFAULTS.items() if k not in inherited_env}
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cpu_threads)}


def sequence_parallel_groups(per_node: Sequence[int], sp: int) -> list[str]:
    """Where the sequence-parallel groups of `sp` consecutive ranks fall on nodes holding `per_node[i]`
    ranks each (ranks numbered node by node), as lines for a person; [] with sp=1."""
    world = sum(per_node)
    if sp <= 1 or world == 0:
        return []
    if world % sp:
        return [f"sequence_parallel {sp}: does not divide the {world} ranks; the train stage refuses to start "
                f"(use a train.sequence_parallel that divides {world})"]
    node_of = [n for n, count in enumerate(per_node) for _ in range(count)]
    spans = []
    for d in range(world // sp):
        nodes = sorted(set(node_of[d * sp:(d + 1) * sp]))
        if len(nodes) > 1:
            spans.append(f"group {d} (ranks {d * sp}-{(d + 1) * sp - 1}) spans nodes "
                         + ", ".join(str(n + 1) for n in nodes))
    counts = sorted(set(per_node))
    per = "/".join(str(c) for c in counts)
    if not spans:
        return [f"sequence_parallel {sp}: {world // sp} group(s) of {sp} consecutive ranks, each on one node "
                f"({per} ranks a node, a multiple of {sp})"]
    shown = spans[:3] + ([f"{len(spans) - 3} more"] if len(spans) > 3 else [])
    return [f"sequence_parallel {sp}: {len(spans)} of {world // sp} group(s) span nodes ({'; '.join(shown)}): "
            f"their state exchange crosses the network in every layer; {per} ranks a node is not a multiple of "
            f"{sp}: put a multiple of {sp} ranks on each node (GPUs or train.cpu_processes per node)"]


# ---------------------------------------------------------------------------------------------
# srun inside a Slurm allocation


@dataclass(frozen=True)
class SlurmAllocation:
    """The nodes a Slurm job has (or, for a dry run, asks for), as the ranks are placed on them."""

    nodes: int
    first_node: str  # the rendezvous host
    gpus_per_node: int  # GPUs the job has on each node; 0: none
    cpus_per_node: int  # CPUs of the job's one task per node, shared by the ranks there
    job_id: Optional[str] = None  # None: not started yet (dry run)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, first_node: str, gpus_per_node: int,
                 cpus_fallback: int) -> "SlurmAllocation":
        """From the variables of a job's step (SLURM_JOB_NUM_NODES, SLURM_CPUS_PER_TASK, ...); the first
        node and the GPUs come from the caller (scontrol, the GPU count)."""
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        cpus = (slurm_count(env.get("SLURM_CPUS_PER_TASK")) or slurm_count(env.get("SLURM_JOB_CPUS_PER_NODE"))
                or cpus_fallback)
        return cls(nodes, first_node, gpus_per_node, cpus, env.get("SLURM_JOB_ID"))


@dataclass(frozen=True)
class SrunPlan:
    """One srun step: `ranks_per_node` tasks on each of `nodes` nodes."""

    nodes: int
    ranks_per_node: int
    gpus_per_node: int  # 0: CPU (gloo) ranks
    cpus_per_rank: int
    master_addr: str
    master_port: Optional[int]  # None: picked when the job starts (dry run)
    env: dict[str, str] = field(default_factory=dict)  # set for every rank, over the launching environment
    job_id: Optional[str] = None
    sequence_parallel: int = 1  # train.sequence_parallel: ranks per group (consecutive ranks)

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def groups(self) -> list[str]:
        """Where the sequence-parallel groups fall (see sequence_parallel_groups); [] without them."""
        return sequence_parallel_groups([self.ranks_per_node] * self.nodes, self.sequence_parallel)

    def placement(self, rank: int) -> tuple[int, int, Optional[int]]:
        """(node index, LOCAL_RANK, GPU index on that node or None) of `rank`: srun's block distribution
        with a fixed count per node; the rank drives cuda:LOCAL_RANK (pipeline/train/trainer.py)."""
        node, local = divmod(rank, self.ranks_per_node)
        return node, local, local if self.gpus_per_node else None

    def srun_args(self, *, step_name: str, log_pattern: str) -> list[str]:
        """The srun command line up to the rank's own command."""
        cmd = ["srun", "--overlap", "--export=ALL", f"--nodes={self.nodes}", f"--ntasks={self.ranks}",
               f"--ntasks-per-node={self.ranks_per_node}", f"--cpus-per-task={self.cpus_per_rank}", "--mem=0",
               "--cpu-bind=none", "--kill-on-bad-exit=1", f"--job-name={step_name}", f"--output={log_pattern}"]
        if self.gpus_per_node:
            cmd.append(f"--gpus-per-node={self.gpus_per_node}")
        return cmd

    def summary(self) -> str:
        """One line, as the launcher prints it."""
        kind = "GPU" if self.gpus_per_node else "CPU"
        return (f"{self.ranks} ranks ({self.nodes} node(s) x {self.ranks_per_node} {kind} ranks, "
                f"rendezvous {self.master_addr}:{self.master_port or '<port picked at start>'}, "
                f"job {self.job_id or '<not started>'})" + "".join(f"; {line}" for line in self.groups()))

    def describe(self, rank_argv: Sequence[str] = (), log_pattern: str = "RUN_DIR/train/logs/rank_%t.log") -> str:
        """Several lines for a person: the srun command, where the ranks go, their environment."""
        per = self.ranks_per_node
        lines = ["$ " + shlex.join(self.srun_args(step_name="xlp-train-<pid>", log_pattern=log_pattern)
                                   + list(rank_argv)),
                 f"ranks: {self.ranks} = {self.nodes} node(s) x {per} "
                 + (f"GPU ranks, one GPU each (--gpus-per-node={self.gpus_per_node})" if self.gpus_per_node
                    else "CPU ranks (gloo)")
                 + f", {self.cpus_per_rank} CPU(s) per rank"]
        last = self.ranks - 1
        for rank in sorted({0, per - 1, per, last} & set(range(self.ranks))):  # each end of the first node, the last
            node, local, gpu = self.placement(rank)
            lines.append(f"  rank {rank}: node {node + 1} of {self.nodes}, LOCAL_RANK={local}"
                         + (f", cuda:{gpu}" if gpu is not None else ""))
        lines.extend(self.groups())
        lines.append(f"rendezvous: MASTER_ADDR={self.master_addr}, "
                     f"MASTER_PORT={self.master_port or '<a free port there, or one the job id picks>'}")
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items())))
        return "\n".join(lines)


def srun_plan(alloc: SlurmAllocation, *, cpu_processes: int, threads: int = 0, device: str = "auto",
              master_port: Optional[int] = None, user_env: Optional[Mapping[str, str]] = None,
              inherited_env: Optional[Mapping[str, str]] = None, sequence_parallel: int = 1) -> SrunPlan:
    """The srun step for `alloc`: one rank per GPU on each node, else `cpu_processes` CPU ranks (with
    train.device=cpu always); the node's CPUs split evenly between its ranks. `user_env` (train.env)
    wins over the plan's defaults, which yield to `inherited_env` (the launching environment).
    `sequence_parallel`: train.sequence_parallel, whose groups the plan places (SrunPlan.groups)."""
    gpus = 0 if device == "cpu" else alloc.gpus_per_node
    per_node = gpus or cpu_processes
    cpus_per_rank = max(1, alloc.cpus_per_node // per_node)
    env = {"MASTER_ADDR": alloc.first_node, "LOCAL_SIZE": str(per_node)}
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)
    env.update(_rank_defaults(inherited_env or {}, gpus=bool(gpus), cpu_threads=threads or cpus_per_rank))
    env.update(user_env or {})
    return SrunPlan(alloc.nodes, per_node, gpus, cpus_per_rank, alloc.first_node, master_port, env, alloc.job_id,
                    max(1, int(sequence_parallel)))


# ---------------------------------------------------------------------------------------------
# Ray Train


@dataclass(frozen=True)
class RayCluster:
    """What Ray Train can place workers on."""

    nodes: int  # alive nodes
    cpus: float
    gpus: float

    @classmethod
    def from_nodes(cls, nodes: Sequence[Mapping]) -> "RayCluster":
        """From `ray.nodes()`: the alive ones."""
        alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
        return cls(len(alive), sum(r.get("CPU", 0) for r in alive), sum(r.get("GPU", 0) for r in alive))


@dataclass(frozen=True)
class RayTrainPlan:
    """Ray Train's ScalingConfig for the ranks, and the environment of its workers."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str  # PACK (one node) | SPREAD (workers spread across the nodes)
    nodes: int
    env: dict[str, str] = field(default_factory=dict)  # set for every worker, over the variables passed on
    sequence_parallel: int = 1  # train.sequence_parallel: workers per group (consecutive world ranks)
    gpus_per_node: int = 0  # each node's GPUs (an even share of the cluster's): where GPU workers go

    def per_node(self) -> list[int]:
        """Workers on each node as the plan expects them: a node's GPUs filled (GPU workers), the workers
        dealt out evenly (SPREAD), or all on one node (PACK). Ray decides at launch; the trainer's log names
        the groups that did span nodes."""
        if self.placement_strategy == "PACK" or self.nodes <= 1:
            return [self.num_workers]
        if self.use_gpu and self.gpus_per_node:
            full, rest = divmod(self.num_workers, self.gpus_per_node)
            return [self.gpus_per_node] * full + ([rest] if rest else [])
        base, extra = divmod(self.num_workers, self.nodes)
        return [base + (1 if n < extra else 0) for n in range(self.nodes) if base or n < extra]

    def groups(self) -> list[str]:
        """Where the sequence-parallel groups fall: Ray Train numbers the workers node by node (see
        sequence_parallel_groups); [] without them."""
        return sequence_parallel_groups(self.per_node(), self.sequence_parallel)

    def scaling_config_kwargs(self) -> dict:
        """Keyword arguments of ray.train.ScalingConfig."""
        return {"num_workers": self.num_workers, "use_gpu": self.use_gpu,
                "resources_per_worker": dict(self.resources_per_worker),
                "placement_strategy": self.placement_strategy}

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else "CPU"
        return "\n".join([
            f"ScalingConfig(num_workers={self.num_workers}, use_gpu={self.use_gpu}, "
            f"resources_per_worker={self.resources_per_worker}, placement_strategy={self.placement_strategy!r})",
            f"workers: {self.num_workers} {kind} workers on {self.nodes} node(s)"
            + (", spread across the nodes" if self.placement_strategy == "SPREAD" else ""),
            *self.groups(),
            "environment: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items())),
        ])


def ray_train_plan(cluster: RayCluster, *, cpu_processes: int, threads: int = 0, device: str = "auto",
                   user_env: Optional[Mapping[str, str]] = None,
                   inherited_env: Optional[Mapping[str, str]] = None, sequence_parallel: int = 1) -> RayTrainPlan:
    """One worker per GPU of the cluster, else `cpu_processes` CPU workers (the cluster's CPUs split
    between them for their threads); spread across the nodes when there are several.
    `sequence_parallel`: train.sequence_parallel, whose groups the plan places (RayTrainPlan.groups)."""
    gpus = 0 if device == "cpu" else int(cluster.gpus)
    n = gpus or cpu_processes
    resources = {"CPU": 1.0, "GPU": 1.0} if gpus else {"CPU": 1.0}
    strategy = "SPREAD" if cluster.nodes > 1 else "PACK"
    cpu_threads = threads or max(1, int(cluster.cpus or n) // n)
    env = _rank_defaults(inherited_env or {}, gpus=bool(gpus), cpu_threads=cpu_threads)
    env.update(user_env or {})
    gpus_per_node = gpus // cluster.nodes if gpus and cluster.nodes else 0
    return RayTrainPlan(n, gpus > 0, resources, strategy, cluster.nodes, env, max(1, int(sequence_parallel)),
                        gpus_per_node)


# ---------------------------------------------------------------------------------------------
# What a submission asks for


def planned_slurm_allocation(slurm) -> SlurmAllocation:
    """The allocation `slurm.*` asks for, before it exists: node names are known only when it starts."""
    return SlurmAllocation(nodes=int(slurm.nodes), first_node="<first node of the job>",
                           gpus_per_node=int(slurm.gpus_per_node), cpus_per_node=int(slurm.cpus_per_task))


def planned_ray_cluster(slurm) -> RayCluster:
    """A Ray cluster of the shape `slurm.*` describes (the shape a recipe is sized for)."""
    nodes = int(slurm.nodes)
    return RayCluster(nodes=nodes, cpus=nodes * int(slurm.cpus_per_task), gpus=nodes * int(slurm.gpus_per_node))


def slurm_consistency_errors(cfg) -> list[str]:
    """What in `slurm.*` and `train.*` contradicts itself for a Slurm job, one message per problem,
    each naming the keys and a value that works."""
    s, t = cfg.slurm, cfg.train
    errors = []
    if s.gpus_per_node and t.device == "cpu":
        errors.append(f"slurm.gpus_per_node={s.gpus_per_node} asks for GPUs but train.device=cpu trains on CPU "
                      "ranks: set slurm.gpus_per_node=0 (or train.device=auto to train on the GPUs)")
    if s.gpus_per_node and s.cpus_per_task < s.gpus_per_node:
        errors.append(f"slurm.cpus_per_task={s.cpus_per_task} is less than one CPU for each of the "
                      f"{s.gpus_per_node} GPU ranks per node (slurm.gpus_per_node={s.gpus_per_node}): "
                      f"set slurm.cpus_per_task={s.gpus_per_node} (or more)")
    if not s.gpus_per_node and s.cpus_per_task < t.cpu_processes:
        errors.append(f"train.cpu_processes={t.cpu_processes} CPU ranks per node need {t.cpu_processes} CPUs but "
                      f"slurm.cpus_per_task={s.cpus_per_task}: set slurm.cpus_per_task={t.cpu_processes} "
                      f"(or train.cpu_processes={s.cpus_per_task})")
    if s.nodes > 1 and t.launcher == "local":
        errors.append(f"train.launcher=local trains on the first of the slurm.nodes={s.nodes} nodes only: set "
                      "train.launcher=auto (srun on every node) or slurm.nodes=1")
    sp = int(t.sequence_parallel)
    gpus = 0 if t.device == "cpu" else int(s.gpus_per_node)
    per_node = gpus or int(t.cpu_processes)
    nodes = 1 if t.launcher == "local" else int(s.nodes)
    if sp > 1 and (nodes * per_node) % sp:
        what = f"slurm.gpus_per_node={gpus}" if gpus else f"train.cpu_processes={per_node}"
        errors.append(f"train.sequence_parallel={sp} does not divide the job's {nodes * per_node} ranks "
                      f"(slurm.nodes={nodes} x {what}): set train.sequence_parallel to a divisor of "
                      f"{nodes * per_node}, or {what.split('=')[0]} to a multiple of {sp}")
    return errors
