"""The training launch as a plan (pipeline/cluster/plan.py) and `xlp submit --dry-run`: GPU and multi-node
settings that cannot run on this machine, rendered and checked. Fast: nothing is queued or started."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import ConfigError, load_config
from xlp.pipeline.cluster.slurm import Partition, SlurmNode, format_time, never_starts, parse_time, request_errors
from xlp.pipeline.cluster.submit import launch_plan, submitted_config
from xlp.pipeline.cluster.plan import (RayCluster, RayTrainPlan, SlurmAllocation, SrunPlan, job_rendezvous_port,
                                 ray_train_plan, slurm_consistency_errors, srun_plan)

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
PRETRAINING = [r for r in RECIPES if not r.stem.startswith("continue_")]  # no checkpoint to give
SOURCES = "data.sources=[/shared/corpus/*.jsonl]"
TWO_BY_EIGHT = ["slurm.gpus_per_node=8", "slurm.nodes=2"]
TINY = REPO / "configs" / "tiny.yaml"


def xlp_submit(*args) -> subprocess.CompletedProcess:
    return subprocess.run(XLP + ["submit", *map(str, args)], env=xlp_env(), capture_output=True, text=True,
                          timeout=300)


def job_config(config, overrides, run_dir, launcher):
    """The config the job would run (what `xlp submit` saves), as a DictConfig."""
    _, text = submitted_config(load_config(config, overrides), run_dir, launcher)
    return OmegaConf.create(text)


def assert_two_nodes_of_eight_gpus(plan: SrunPlan, first_node: str):
    assert (plan.nodes, plan.ranks_per_node, plan.ranks, plan.gpus_per_node) == (2, 8, 16, 8)
    placed = [plan.placement(r) for r in range(plan.ranks)]
    # one GPU per rank: every (node, GPU) pair exactly once; LOCAL_RANK is the GPU index
    assert sorted((node, gpu) for node, _, gpu in placed) == [(n, g) for n in range(2) for g in range(8)]
    assert all(local == gpu for _, local, gpu in placed)
    assert [node for node, _, _ in placed] == [0] * 8 + [1] * 8
    assert plan.master_addr == first_node and plan.env["MASTER_ADDR"] == first_node
    assert plan.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert plan.env["LOCAL_SIZE"] == "8"
    assert "DS_ACCELERATOR" not in plan.env  # GPUs: DeepSpeed's CUDA accelerator
    args = plan.srun_args(step_name="s", log_pattern="l")
    for flag in ("--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert flag in args


# ---------------------------------------------------------------------------------------------
# every recipe on 2 nodes x 8 GPUs


def continue_keys(tmp_path: Path) -> list[str]:
    """What a continued-pretraining recipe needs from its user: a released checkpoint (here a tiny
    transformers-format one written by our exporter) and its tokenizer."""
    import torch

    from xlp.xlstm_model import ModelConfig, build_model, hf

    cfg = ModelConfig(arch="xlstm_large", vocab_size=384, d_model=128, num_blocks=2, num_heads=2, tie_weights=False)
    torch.manual_seed(0)
    hf.save_hf(build_model(cfg), cfg, tmp_path / "ckpt")
    return [f"model.init_from=hf:{tmp_path / 'ckpt'}", f"tokenizer.path={tmp_path / 'ckpt'}"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run_on_two_nodes_of_eight_gpus(recipe, tmp_path):
    run_dir = tmp_path / "run"
    given = continue_keys(tmp_path) if recipe.stem.startswith("continue_") else []
    proc = xlp_submit(recipe, "--to", "slurm", "--dry-run", "--no-check", SOURCES, *TWO_BY_EIGHT, *given,
                      "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --nodes=2" in lines
    (srun,) = [line for line in lines if line.startswith("$ srun ")]
    srun = shlex.split(srun[2:])
    for flag in ("--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert flag in srun, srun
    assert "train.device=cpu" not in srun
    assert "ranks: 16 = 2 node(s) x 8 GPU ranks, one GPU each" in out
    assert "rank 8: node 2 of 2, LOCAL_RANK=0, cuda:0" in out
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert "nothing was queued (--dry-run)" in out
    assert not run_dir.exists()  # nothing written

    # the same plans as objects: srun on the allocation asked for, Ray Train on a cluster of that shape
    plan = launch_plan(job_config(recipe, [SOURCES, *TWO_BY_EIGHT, *given], run_dir, "slurm"))
    assert isinstance(plan, SrunPlan)
    assert_two_nodes_of_eight_gpus(plan, "<first node of the job>")
    ray = launch_plan(job_config(recipe, [SOURCES, *TWO_BY_EIGHT, *given], run_dir, "ray"))
    assert isinstance(ray, RayTrainPlan)
    assert (ray.num_workers, ray.use_gpu, ray.placement_strategy, ray.nodes) == (16, True, "SPREAD", 2)
    assert ray.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert ray.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("recipe", PRETRAINING[:1], ids=lambda p: p.stem)
def test_ray_dry_run_prints_the_job_and_spreads_the_workers(recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = xlp_submit(recipe, "--to", "ray", "--dry-run", SOURCES, *TWO_BY_EIGHT, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    (entry,) = [line for line in out.splitlines() if line.startswith("entrypoint: ")]
    assert shlex.split(entry)[2:5] == ["-m", "xlp.pipeline.cli", "run"] and f"--run-dir {run_dir}" in entry
    assert '"PYTHONSAFEPATH"' in out and "runtime_env: " in out
    assert "ScalingConfig(num_workers=16, use_gpu=True" in out and "placement_strategy='SPREAD'" in out
    assert "nothing was submitted (--dry-run)" in out
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# the plan from a job's environment, as SlurmRanks and RayRanks build it


def test_srun_plan_from_the_environment_of_a_two_node_gpu_job():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "64",
           "SLURM_JOB_CPUS_PER_NODE": "64(x2)", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    alloc = SlurmAllocation.from_env(env, first_node="gpu07", gpus_per_node=8, cpus_fallback=2)
    port = job_rendezvous_port(env["SLURM_JOB_ID"])
    plan = srun_plan(alloc, cpu_processes=2, master_port=port, user_env={"NCCL_SOCKET_IFNAME": "ib0"},
                     inherited_env={})
    assert_two_nodes_of_eight_gpus(plan, "gpu07")
    assert plan.cpus_per_rank == 8 and "--cpus-per-task=8" in plan.srun_args(step_name="s", log_pattern="l")
    assert plan.env["MASTER_PORT"] == str(port) and 20000 <= port < 40000
    assert plan.env["NCCL_SOCKET_IFNAME"] == "ib0"  # train.env reaches the ranks
    assert "16 ranks (2 node(s) x 8 GPU ranks, rendezvous gpu07:" in plan.summary()


def test_srun_plan_on_cpu():
    alloc = SlurmAllocation(nodes=2, first_node="n1", gpus_per_node=8, cpus_per_node=8, job_id="7")
    plan = srun_plan(alloc, cpu_processes=2, device="cpu", master_port=1234)  # train.device=cpu beats the GPUs
    assert (plan.ranks, plan.ranks_per_node, plan.gpus_per_node, plan.cpus_per_rank) == (4, 2, 0, 4)
    assert plan.env["DS_ACCELERATOR"] == "cpu" and plan.env["OMP_NUM_THREADS"] == "4"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in plan.env
    assert not any(a.startswith("--gpus") for a in plan.srun_args(step_name="s", log_pattern="l"))
    assert plan.placement(3) == (1, 1, None)
    assert srun_plan(alloc, cpu_processes=2, device="cpu", threads=1).env["OMP_NUM_THREADS"] == "1"


def test_environment_precedence():
    alloc = SlurmAllocation(nodes=1, first_node="n1", gpus_per_node=4, cpus_per_node=16)
    # the launching environment's value stays (srun --export=ALL passes it), the config's wins
    inherited = srun_plan(alloc, cpu_processes=1, inherited_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in inherited.env
    configured = srun_plan(alloc, cpu_processes=1, inherited_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"},
                           user_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "NCCL_DEBUG": "WARN"})
    assert configured.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0" and configured.env["NCCL_DEBUG"] == "WARN"


def test_ray_plan_from_the_cluster_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    cluster = RayCluster.from_nodes(nodes)
    assert (cluster.nodes, cluster.cpus, cluster.gpus) == (2, 128, 16)
    plan = ray_train_plan(cluster, cpu_processes=2)
    assert plan.scaling_config_kwargs() == {"num_workers": 16, "use_gpu": True,
                                            "resources_per_worker": {"CPU": 1.0, "GPU": 1.0},
                                            "placement_strategy": "SPREAD"}
    # one node: Ray's default packing; CPU workers share the CPUs for their threads
    one = ray_train_plan(RayCluster(nodes=1, cpus=2, gpus=0), cpu_processes=2)
    assert (one.num_workers, one.use_gpu, one.placement_strategy) == (2, False, "PACK")
    assert one.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    assert ray_train_plan(cluster, cpu_processes=3, device="cpu").num_workers == 3


def test_plans_keep_each_sequence_parallel_group_on_one_node():
    """train.sequence_parallel=N: groups of N consecutive ranks; srun and Ray Train number the ranks node
    by node, so a multiple of N ranks a node keeps every group on one node; otherwise the plans name the
    groups that span nodes (and a world N does not divide)."""
    two_by_eight = SlurmAllocation(nodes=2, first_node="n1", gpus_per_node=8, cpus_per_node=64)
    plan = srun_plan(two_by_eight, cpu_processes=1, sequence_parallel=4)
    whole = "sequence_parallel 4: 4 group(s) of 4 consecutive ranks, each on one node (8 ranks a node, a multiple of 4)"
    assert plan.groups() == [whole]
    assert whole in plan.describe().splitlines() and plan.summary().endswith(f"; {whole}")
    assert srun_plan(two_by_eight, cpu_processes=1).groups() == []  # no sequence parallelism: nothing said

    three = srun_plan(SlurmAllocation(nodes=2, first_node="n1", gpus_per_node=0, cpus_per_node=6), cpu_processes=3,
                      sequence_parallel=2)
    (line,) = three.groups()
    assert line.startswith("sequence_parallel 2: 1 of 3 group(s) span nodes (group 1 (ranks 2-3) spans nodes 1, 2): "
                           "their state exchange crosses the network in every layer; 3 ranks a node is not a "
                           "multiple of 2: put a multiple of 2 ranks on each node"), line
    assert srun_plan(two_by_eight, cpu_processes=1, sequence_parallel=3).groups() == [
        "sequence_parallel 3: does not divide the 16 ranks; the train stage refuses to start (use a "
        "train.sequence_parallel that divides 16)"]

    gpus = ray_train_plan(RayCluster(nodes=2, cpus=128, gpus=16), cpu_processes=1, sequence_parallel=8)
    assert gpus.per_node() == [8, 8]
    assert "sequence_parallel 8: 2 group(s) of 8 consecutive ranks, each on one node" in gpus.describe()
    # 6 CPU workers spread over 4 nodes: 2, 2, 1, 1; the third pair is split
    cpus = ray_train_plan(RayCluster(nodes=4, cpus=16, gpus=0), cpu_processes=6, sequence_parallel=2)
    assert cpus.per_node() == [2, 2, 1, 1]
    assert "1 of 3 group(s) span nodes (group 2 (ranks 4-5) spans nodes 3, 4)" in cpus.describe()
    packed = ray_train_plan(RayCluster(nodes=1, cpus=4, gpus=0), cpu_processes=4, sequence_parallel=2)
    assert packed.groups() == ["sequence_parallel 2: 2 group(s) of 2 consecutive ranks, each on one node "
                               "(4 ranks a node, a multiple of 2)"]


def test_submit_refuses_a_sequence_parallel_that_does_not_divide_the_job():
    cfg = load_config(TINY, ["model.arch=xlstm_large", "model.slstm_at=[]", "train.sequence_parallel=4", "slurm.nodes=2",
                             "slurm.gpus_per_node=3", "slurm.cpus_per_task=3"])
    assert ("train.sequence_parallel=4 does not divide the job's 6 ranks (slurm.nodes=2 x slurm.gpus_per_node=3): "
            "set train.sequence_parallel to a divisor of 6, or slurm.gpus_per_node to a multiple of 4"
            ) in slurm_consistency_errors(cfg)
    assert slurm_consistency_errors(load_config(TINY, ["model.arch=xlstm_large", "model.slstm_at=[]", "train.sequence_parallel=2"])) == []


def test_submit_dry_run_says_where_sequence_parallel_groups_go(tmp_path):
    proc = xlp_submit(TINY, "--to", "slurm", "--dry-run", "--no-check", "model.arch=xlstm_large", "model.slstm_at=[]",
                      "train.sequence_parallel=2", "slurm.nodes=2", "slurm.gpus_per_node=3", "slurm.cpus_per_task=3",
                      "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "sequence_parallel 2: 1 of 3 group(s) span nodes (group 1 (ranks 2-3) spans nodes 1, 2)" in proc.stdout


# ---------------------------------------------------------------------------------------------
# consistency of slurm.* and train.*


@pytest.mark.parametrize("overrides, message", [
    (["slurm.gpus_per_node=8", "train.device=cpu"],
     "slurm.gpus_per_node=8 asks for GPUs but train.device=cpu trains on CPU ranks: set slurm.gpus_per_node=0"),
    (["slurm.gpus_per_node=8", "slurm.cpus_per_task=4"],
     "slurm.cpus_per_task=4 is less than one CPU for each of the 8 GPU ranks per node (slurm.gpus_per_node=8): "
     "set slurm.cpus_per_task=8"),
    (["train.cpu_processes=4", "slurm.cpus_per_task=2"],
     "train.cpu_processes=4 CPU ranks per node need 4 CPUs but slurm.cpus_per_task=2: set slurm.cpus_per_task=4"),
    (["slurm.nodes=2", "train.launcher=local"],
     "train.launcher=local trains on the first of the slurm.nodes=2 nodes only"),
])
def test_inconsistent_slurm_and_train_keys_are_refused_before_anything(overrides, message, tmp_path):
    cfg = load_config(TINY, overrides)
    assert any(message in e for e in slurm_consistency_errors(cfg))
    run_dir = tmp_path / "run"
    proc = xlp_submit(TINY, "--to", "slurm", "--dry-run", *overrides, "--run-dir", run_dir)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_the_defaults_and_recipes_are_consistent(tmp_path):
    assert slurm_consistency_errors(load_config(REPO / "configs" / "demo.yaml")) == []
    for recipe in RECIPES:
        given = [] if recipe in PRETRAINING else continue_keys(tmp_path)
        assert slurm_consistency_errors(load_config(recipe, [SOURCES, *given])) == []


def test_bad_slurm_and_train_env_values_name_the_key():
    with pytest.raises(ConfigError, match=r"`slurm.time` is 'two days'; use Slurm's format"):
        load_config(TINY, ["slurm.time=two days"])
    with pytest.raises(ConfigError, match=r"`slurm.nodes` is 0; must be >= 1"):
        load_config(TINY, ["slurm.nodes=0"])
    with pytest.raises(ConfigError, match=r"`train.env.WANDB_API_KEY` looks like a secret"):
        load_config(TINY, ["train.env.WANDB_API_KEY=abc"])
    with pytest.raises(ConfigError, match=r"`train.env.NCCL-X` is not an environment variable name"):
        load_config(TINY, ["train.env.NCCL-X=1"])
    cfg = load_config(TINY, ["train.env.NCCL_DEBUG=WARN"])
    assert dict(cfg.train.env) == {"NCCL_DEBUG": "WARN"}


# ---------------------------------------------------------------------------------------------
# a request against a partition (sinfo's view as data: GPUs, memory and time limits this machine's
# Slurm does not have; tests/test_submit.py checks the real partition)


def partition(gpus=8, cpus=64, memory_mb=512_000, count=2, time_limit="2-00:00:00", max_nodes=None):
    nodes = tuple(SlurmNode(f"gpu{i:02d}", cpus, memory_mb, gpus, "idle") for i in range(1, count + 1))
    return Partition("gpu", nodes, parse_time(time_limit), max_nodes)


def slurm_keys(**kw):
    base = dict(nodes=2, gpus_per_node=8, cpus_per_task=64, time="24:00:00", extra=[])
    return OmegaConf.create({**base, **kw})


def test_a_request_that_fits_has_no_errors():
    assert request_errors(slurm_keys(), partition()) == []


def test_unavailable_nodes():
    nodes = tuple(SlurmNode(f"n{i}", 2, 1000, 0, state) for i, state in
                  enumerate(["idle", "mix", "alloc", "down*", "drain", "idle*", "unk", "drng"]))
    names = [n.name for n in Partition("p", nodes, None, None).unavailable_nodes()]
    assert names == ["n3", "n4", "n5", "n6", "n7"]


@pytest.mark.parametrize("keys, part, message", [
    (dict(gpus_per_node=8), dict(gpus=0),
     "slurm.gpus_per_node=8 but the nodes of partition gpu have no GPUs (gpu gres): set slurm.gpus_per_node=0"),
    (dict(gpus_per_node=8), dict(gpus=4),
     "slurm.gpus_per_node=8 but the nodes of partition gpu have at most 4 GPUs: set slurm.gpus_per_node=4 (or less)"),
    (dict(cpus_per_task=128), {},
     "slurm.cpus_per_task=128 but the nodes of partition gpu with enough GPUs have at most 64 CPUs: "
     "set slurm.cpus_per_task=64 (or less)"),
    (dict(nodes=4), {}, "slurm.nodes=4 but partition gpu has 2 node(s): set slurm.nodes=2 (or less)"),
    (dict(nodes=2), dict(max_nodes=1),
     "slurm.nodes=2 but partition gpu takes jobs of at most 1 node(s): set slurm.nodes=1 (or less)"),
    (dict(time="3-00:00:00"), {},
     "slurm.time=3-00:00:00 is longer than partition gpu's time limit 2-00:00:00: set slurm.time=2-00:00:00"),
    (dict(extra=["--mem=1T"]), {},
     "slurm.extra asks for --mem=1048576M but the nodes of partition gpu have at most 512000M"),
])
def test_a_request_that_cannot_fit_names_the_key_and_what_fits(keys, part, message):
    errors = request_errors(slurm_keys(**keys), partition(**part))
    assert any(message in e for e in errors), errors


def test_slurm_times():
    assert parse_time("60") == 3600 and parse_time("1:30") == 90 and parse_time("24:00:00") == 86400
    assert parse_time("2-00:00:00") == 2 * 86400 and parse_time("1-12") == 36 * 3600
    assert parse_time("infinite") is None and parse_time("UNLIMITED") is None
    assert format_time(86400 + 3661) == "1-01:01:01" and format_time(3600) == "01:00:00"
    with pytest.raises(ValueError):
        parse_time("two days")


def test_pending_reasons_that_never_start():
    assert never_starts("PartitionNodeLimit") == "slurm.nodes"
    assert never_starts("PartitionTimeLimit") == "slurm.time"
    assert "slurm.cpus_per_task" in never_starts("PartitionConfig")
    for waiting in ("Resources", "Priority", "Dependency", "BeginTime", "None"):
        assert never_starts(waiting) is None
    # a node that is down may come back; one that does not exist never will
    assert never_starts("ReqNodeNotAvail, UnavailableNodes:n2", ["n1", "n2"]) is None
    assert never_starts("ReqNodeNotAvail, UnavailableNodes:n9", ["n1", "n2"]) == "slurm.extra (--nodelist)"


def test_submit_help_explains_the_checks_and_dry_run():
    proc = subprocess.run(XLP + ["submit", "--help"], env=xlp_env(), capture_output=True, text=True, timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for phrase in ("--dry-run", "--no-check", "sbatch --test-only", "sinfo", "PartitionConfig",
                   "slurm.gpus_per_node"):
        assert phrase in text, phrase
    assert re.search(r"--wait .*pending reason", text)


# ---------------------------------------------------------------------------------------------
# hostile and careless values on their way into the sbatch script (issue 29, item 1)

# the command, as the shell passes it: YAML's double quotes make `\n` a line break
INJECTED_NAME = r'run.name="y\nid > /tmp/pwned\n#"'


@pytest.mark.parametrize("override, message", [
    (INJECTED_NAME, r"config key `run.name` is 'y\nid > /tmp/pwned\n#': use letters, digits"),
    ("slurm.account=a b; echo x", "config key `slurm.account` is 'a b; echo x': a Slurm account is letters"),
    (r'slurm.partition="gpu\n#SBATCH --qos=top"', r"config key `slurm.partition` is 'gpu\n#SBATCH --qos=top'"),
    (r'slurm.job_name="x`id`"', "config key `slurm.job_name` is 'x`id`': use letters, digits"),
    (r'slurm.extra=["--qos=high\nid"]', r"config key `slurm.extra[0]` is '--qos=high\nid': it holds the control "
                                        r"character(s) '\n'"),
    ("slurm.extra=[id]", "config key `slurm.extra[0]` is 'id': each slurm.extra item is an sbatch option"),
    ("slurm.extra=[\"--comment='open\"]", "config key `slurm.extra[0]` is \"--comment='open\": No closing quotation"),
    ("run.name=" + "a" * 300, "config key `run.name` is 300 characters long ('aaaa"),
    ("run.name=`id`", "command-line override 'run.name': the value '`id`' is not valid YAML"),
    ('run.name="`id`"', "config key `run.name` is '`id`': use letters, digits"),
    (r'run.dir="/tmp/x\ny"', r"config key `run.dir` is '/tmp/x\ny': it holds the control character(s) '\n'"),
], ids=["issue-injection", "account", "partition", "job-name", "extra-newline", "extra-not-option", "extra-quote",
        "name-300-chars", "name-backtick-unquoted", "name-backtick", "run-dir"])
def test_a_value_that_would_break_the_sbatch_script_is_a_config_error(override, message, tmp_path, monkeypatch, capsys):
    """`xlp submit ... --dry-run --no-check` with a hostile or careless value: exit 1 with the key and what it
    may hold, no traceback, nothing written (the issue: a newline in run.name made `id > /tmp/pwned` a
    command of the script and hid the #SBATCH lines after it)."""
    from xlp.pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # the default run directory is runs/${run.name}, relative
    assert main(["submit", str(TINY), "--to", "slurm", "--dry-run", "--no-check", override]) == 1
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.err.startswith("xlp submit: error: config") or "override" in captured.err
    assert "Traceback" not in captured.err and "#SBATCH" not in captured.out
    assert list(tmp_path.iterdir()) == []


def sbatch_options(script: str) -> list[str]:
    """The options sbatch reads from `script`: the #SBATCH lines before the first command, each split as
    sbatch splits it (quotes and backslashes as the shell reads them; an unquoted '#' ends the line)."""
    options = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            options += shlex.split(line[len("#SBATCH"):], comments=True)
        elif line.strip() and not line.strip().startswith("#"):
            break
    return options


def test_the_dry_run_script_keeps_every_sbatch_line_before_its_first_command(tmp_path, monkeypatch, capsys):
    """Every slurm.* value in its place; a run directory with a space, a '#' and a quote reaches sbatch
    whole; the script is valid bash; a --run-dir with a line break is refused, naming it."""
    from xlp.pipeline.cli import main
    from xlp.pipeline.cluster.submit import late_sbatch_lines
    from xlp.pipeline.core.layout import RunLayout

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "odd run #1 'x'"
    assert main(["submit", str(TINY), "--to", "slurm", "--dry-run", "--no-check", "--run-dir", str(run_dir),
                 "slurm.partition=gpu,debug", "slurm.account=proj_1.a", "slurm.job_name=xlp-odd.1",
                 "slurm.extra=[--qos=high, \"#SBATCH --comment='a b'\"]"]) == 0
    out = capsys.readouterr().out
    script = out.split("== sbatch script (")[1].split("\n", 1)[1].split("\n== training launch")[0]
    assert late_sbatch_lines(script) == []
    options = sbatch_options(script)
    assert len(options) == script.count("\n#SBATCH")  # one option a line: every #SBATCH line is read
    for option in ("--job-name=xlp-odd.1", "--partition=gpu,debug", "--account=proj_1.a", "--qos=high",
                   "--comment=a b", "--time=24:00:00", "--requeue", "--signal=B:TERM@300",
                   f"--output={RunLayout(run_dir).slurm_log('%j')}"):
        assert option in options, (option, options)
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    assert not run_dir.exists()

    bad_dir = tmp_path / "a\nid #"
    assert main(["submit", str(TINY), "--to", "slurm", "--dry-run", "--no-check", "--run-dir", str(bad_dir)]) == 1
    err = capsys.readouterr().err
    assert "the run directory (--run-dir or run.dir)" in err and r"control character(s) '\n'" in err, err
