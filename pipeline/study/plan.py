"""`xlp study CONFIG`: several variants of one run (another model, learning rate, ...) on the same data.

A study config is a run config with a `study:` section:

    defaults:
      - ../tiny.yaml
    run:
      name: xlstm_vs_llama          # the study's name; run.dir is the study's directory
    study:
      variants:
        - {name: xlstm, overrides: [model=tiny]}
        - {name: llama, overrides: [model=tiny_llama, train.lr=0.002]}

Each variant is the config with its overrides applied after the command line's. The study directory
(STUDY_DIR = run.dir) holds:

    STUDY_DIR/data/               the tokenizer and shard stages, run once for every variant whose data
                                  stages have the fingerprint of the study's own config
    STUDY_DIR/data-<fp>/          the same for variants whose overrides change the data stages (rare)
    STUDY_DIR/<variant>/          a run directory: train/ and eval/ of its own; tokenizer/ and shard/
                                  are links to its data directory, so `xlp status` and `xlp run` on it
                                  work as on any run
    STUDY_DIR/report.md           the study report with its PNGs (pipeline/study/report.py)
    STUDY_DIR/report.json         every number of the report, and the fingerprint it was made from

Every step is cached as in `xlp run`: data stages by their fingerprint, each variant's train and eval
by theirs, the report by the fingerprints of the evals it reads; a rerun does only what changed.
Every variant is checked before anything runs: a bad override names its variant.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig, OmegaConf

from xlp.pipeline.cluster.submit import submit_slurm
from xlp.pipeline.core.config import ConfigError, load_config
from xlp.pipeline.core.layout import RunLayout, StudyLayout
from xlp.pipeline.core.registry import STAGES
from xlp.pipeline.core.stage import fingerprints, read_stage_json
from xlp.pipeline.runner import keep_stale, stage_states
from xlp import xlstm_model  # count_params loads torch on first use (PEP 562)

DATA_STAGES = ("tokenizer", "shard")
VARIANT_STAGES = ("train", "eval")



@dataclass
class PlannedVariant:
    name: str
    cfg: DictConfig
    run_dir: Path
    data_dir: Path


@dataclass
class StudyPlan:
    name: str
    study_dir: Path
    base: DictConfig  # the study's config without any variant's overrides
    data_runs: dict[Path, DictConfig]  # data directory -> the config its data stages run with
    variants: list[PlannedVariant]


def plan_study(config: str | Path, overrides: list[str] | tuple[str, ...] = (),
               study_dir: str | os.PathLike | None = None) -> StudyPlan:
    """Load and check the study and every variant's config; raises ConfigError naming the variant."""
    base = load_config(config, overrides)
    variants = list(base.study.variants)
    if not variants:
        raise ConfigError(f"{config}: no `study.variants`; a study needs at least one, e.g.\n"
                          "study:\n  variants:\n    - {name: xlstm, overrides: [model=tiny]}")
    root = Path(study_dir or base.run.dir).absolute()
    group = str(base.wandb.group or base.run.name)
    data_stages = [s for s in STAGES if s.name in DATA_STAGES]

    def data_key(cfg: DictConfig) -> tuple[str, ...]:
        fps = fingerprints(data_stages, cfg)
        return tuple(fps[s] for s in DATA_STAGES)

    layout = StudyLayout(root)
    data_base = load_config(config, list(overrides) + ["study.variants=[]"])  # the data runs' config, likewise
    base_key = data_key(data_base)
    data_runs: dict[Path, DictConfig] = {}
    planned = []
    for i, v in enumerate(variants):
        run_dir = layout.variant_dir(v.name)
        # a variant's run is a plain run: its saved config (and a Slurm job's) holds no list of variants
        own = [f"run.name={base.run.name}-{v.name}", f"run.dir={run_dir}", f"wandb.group={group}", "study.variants=[]"]
        try:
            cfg = load_config(config, list(overrides) + list(v.overrides) + own)
        except ConfigError as e:
            raise ConfigError(f"study variant {v.name!r} (study.variants[{i}], overrides {list(v.overrides)}): {e}") from None
        key = data_key(cfg)
        data_dir = layout.data_dir() if key == base_key else layout.data_dir(key[-1])
        data_runs.setdefault(data_dir, data_base if key == base_key else cfg)
        planned.append(PlannedVariant(v.name, cfg, run_dir, data_dir))
    return StudyPlan(str(base.run.name), root, base, data_runs, planned)



def link_data(variant: PlannedVariant, out: TextIO) -> None:
    """Make RUN_DIR/tokenizer and RUN_DIR/shard of the variant links to its data directory's. A real
    directory there (a run made by `xlp run`) is moved to RUN_DIR/.stale/, never deleted."""
    layout = RunLayout(variant.run_dir)
    variant.run_dir.mkdir(parents=True, exist_ok=True)
    for stage in DATA_STAGES:
        link = layout.stage_dir(stage)
        target = Path(os.path.relpath(RunLayout(variant.data_dir).stage_dir(stage), variant.run_dir))
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()  # a link to another data directory: only the link goes
        elif link.exists():
            kept = keep_stale(layout, stage, read_stage_json(link))
            print(f"~ {variant.name}: {link} was a directory of its own; kept in {kept}", file=out, flush=True)
        link.symlink_to(target, target_is_directory=True)


def model_vocab(cfg: DictConfig) -> int:
    """model.vocab_size, or tokenizer.vocab_size rounded up to a multiple of 64 as the train stage does."""
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size)
    return -(-int(cfg.tokenizer.vocab_size) // 64) * 64


def print_plan(plan: StudyPlan, config: str, overrides: list[str], out: TextIO) -> None:
    """What `xlp study` would do, and the `xlp run` commands that do the same one step at a time (what to
    give `xlp submit` to run a variant on a cluster: each command then runs in its own job)."""
    print(f"study {plan.name}: {len(plan.variants)} variant(s), directory {plan.study_dir}", file=out)
    for data_dir in plan.data_runs:
        print(f"  data: {data_dir} (tokenizer, shard; shared by "
              f"{', '.join(v.name for v in plan.variants if v.data_dir == data_dir)})", file=out)
    for v in plan.variants:
        mcfg = OmegaConf.to_container(v.cfg.model, resolve=True)
        mcfg["vocab_size"] = model_vocab(v.cfg)
        params = xlstm_model.count_params(mcfg)
        print(f"  {v.name}: {mcfg['arch']}, d_model {mcfg['d_model']}, {mcfg['num_blocks']} blocks, "
              f"{params / 1e6:.2f}M parameters, {v.cfg.train.steps} steps -> {v.run_dir}", file=out)
    print("step by step (e.g. each as an `xlp submit ... --to slurm` job; link the data dirs first):", file=out)
    base = ["xlp", "run", str(config), *overrides]
    for data_dir in plan.data_runs:
        print("  " + shlex.join(base + [f"run.dir={data_dir}", "--stages", ",".join(DATA_STAGES)]), file=out)
    for v in plan.variants:
        variant_overrides = list(next(x.overrides for x in plan.base.study.variants if x.name == v.name))
        print(f"  mkdir -p {shlex.quote(str(v.run_dir))}", file=out)
        for stage in DATA_STAGES:
            print(f"  ln -sfn {shlex.quote(os.path.relpath(v.data_dir / stage, v.run_dir))} "
                  f"{shlex.quote(str(v.run_dir / stage))}", file=out)
        print("  " + shlex.join(base + variant_overrides + [f"run.name={v.cfg.run.name}", f"run.dir={v.run_dir}",
                                                            f"wandb.group={v.cfg.wandb.group}", "--stages",
                                                            ",".join(VARIANT_STAGES)]), file=out)


def submit_study(plan: StudyPlan, *, out: TextIO, dry_run: bool = False, check: bool = True,
                 force: bool = False) -> int:
    """`xlp submit STUDY_CONFIG --to slurm`: one Slurm job per data directory whose stages are not done
    (tokenizer, shard), then one job per variant (train, eval) that starts once its data job completed,
    so Slurm runs the variants side by side as far as the partition has room. The variants' run
    directories and their links to the data are made here (the filesystem is shared). When the jobs are
    done, `xlp study CONFIG --report-only` (or a plain `xlp study CONFIG`, which finds everything done)
    writes the report. Returns the exit status."""
    data_stages = [s for s in STAGES if s.name in DATA_STAGES]
    data_jobs: dict[Path, str] = {}
    for data_dir, cfg in plan.data_runs.items():
        if not force and all(s.status == "done" for s in stage_states(data_stages, cfg, data_dir)):
            print(f"== data ({data_dir.name}): done, nothing to submit", file=out, flush=True)
            continue
        print(f"== data ({data_dir.name}): {', '.join(DATA_STAGES)}", file=out, flush=True)
        queued: list[str] = []
        rc = submit_slurm(cfg, run_dir=data_dir, only=list(DATA_STAGES), force=force, wait=False, out=out,
                          dry_run=dry_run, check=check, queued=queued)
        if rc:
            return rc
        data_jobs[data_dir] = queued[0] if queued else "DATA_JOB_ID"  # a dry run queues nothing
    for v in plan.variants:
        after = data_jobs.get(v.data_dir)
        print(f"== variant {v.name}: {', '.join(VARIANT_STAGES)}" + (f", after job {after}" if after else ""),
              file=out, flush=True)
        if not dry_run:
            link_data(v, out)
        rc = submit_slurm(v.cfg, run_dir=v.run_dir, only=list(VARIANT_STAGES), force=force, wait=False, out=out,
                          dry_run=dry_run, check=check, after=after)
        if rc:
            return rc
    print(f"when the jobs are done, write the report ({StudyLayout(plan.study_dir).report}): "
          "xlp study CONFIG --report-only",
          file=out, flush=True)
    return 0
