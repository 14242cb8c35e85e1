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
    STUDY_DIR/report.md           the study report with its PNGs (pipeline/eval/study_report.py)
    STUDY_DIR/report.json         every number of the report, and the fingerprint it was made from

Every step is cached as in `xlp run`: data stages by their fingerprint, each variant's train and eval
by theirs, the report by the fingerprints of the evals it reads; a rerun does only what changed.
Every variant is checked before anything runs: a bad override names its variant.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from omegaconf import DictConfig

from xlp.pipeline.layout import StudyLayout

DATA_STAGES = ("tokenizer", "shard")
VARIANT_STAGES = ("train", "eval")
RESERVED_NAMES = ("data", "report", "wandb")  # and data-*: names in the study directory (StudyLayout)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# keys a variant may not set: the study sets them for each variant
STUDY_OWNED = ("run.name", "run.dir", "wandb.group", "study")


@dataclass
class StudyVariant:
    """One entry of `study.variants`."""

    name: str = ""  # its directory under the study's and its label in the report
    overrides: list[str] = field(default_factory=list)  # applied after the command line's, e.g. [model=tiny_llama]


@dataclass
class StudyConfig:
    """`study.*`: read only by `xlp study` (no stage reads it, so it changes no fingerprint)."""

    variants: list[StudyVariant] = field(default_factory=list)

    def validate(self) -> None:
        seen: dict[str, int] = {}
        for i, v in enumerate(self.variants):
            where = f"study.variants[{i}]"
            if not v.name or not NAME_RE.match(v.name):
                raise ValueError(f"{where}: name {v.name!r} must be letters, digits, '_', '-', '.' (it names the "
                                 "variant's directory), e.g. name: xlstm_small")
            if v.name in RESERVED_NAMES or v.name.startswith("data-"):
                raise ValueError(f"{where}: name {v.name!r} is reserved in the study directory; pick another")
            if v.name in seen:
                raise ValueError(f"study variant {v.name!r}: the name is used twice (study.variants[{seen[v.name]}] "
                                 f"and [{i}]); variant names must be unique")
            seen[v.name] = i
            for item in v.overrides:
                key = str(item).partition("=")[0]
                if any(key == k or key.startswith(k + ".") for k in STUDY_OWNED):
                    raise ValueError(f"study variant {v.name!r} ({where}): override {item!r} sets `{key}`, which the "
                                     f"study sets for each variant ({', '.join(STUDY_OWNED)}); remove it")


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
    from xlp.pipeline.config import ConfigError, load_config
    from xlp.pipeline.stage import fingerprints
    from xlp.pipeline.stages import STAGES

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
    from xlp.pipeline.layout import RunLayout
    from xlp.pipeline.runner import keep_stale
    from xlp.pipeline.stage import read_stage_json

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


@dataclass
class StudyOutcome:
    data: dict[str, dict[str, str]] = field(default_factory=dict)  # data dir name -> {stage: ran|skipped}
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> {stage: ran|skipped}
    failed: dict[str, str] = field(default_factory=dict)  # variant -> error
    report: str = "skipped"  # ran | skipped | none (no variant evaluated)


def run_study(plan: StudyPlan, *, out: TextIO | None = None, force: bool = False,
              only: Optional[list[str]] = None) -> StudyOutcome:
    """Run the data stages once per data directory, then each variant's train and eval (in order, on
    this machine), then the report. A variant that fails does not stop the others; the outcome lists
    it (the caller exits non-zero). `only`: these variants' names (the report still shows every
    variant that has an eval)."""
    from xlp.pipeline.eval import study_report
    from xlp.pipeline.runner import PipelineError, _ensure_ray, run_pipeline

    out = out or sys.stdout
    outcome = StudyOutcome()
    wanted = [v for v in plan.variants if only is None or v.name in only]
    unknown = sorted(set(only or ()) - {v.name for v in plan.variants})
    if unknown:
        raise PipelineError(f"no study variant named {', '.join(unknown)}; variants: "
                            f"{', '.join(v.name for v in plan.variants)}")
    print(f"study {plan.name}: {len(plan.variants)} variant(s) in {plan.study_dir}", file=out, flush=True)
    started_ray = _ensure_ray()  # one Ray instance for every run of the study
    try:
        for data_dir in sorted({v.data_dir for v in wanted}):
            print(f"== data ({data_dir.name}): {', '.join(DATA_STAGES)}", file=out, flush=True)
            outcome.data[data_dir.name] = run_pipeline(plan.data_runs[data_dir], only=list(DATA_STAGES),
                                                       run_dir=data_dir, out=out, force=force)
        for v in wanted:
            print(f"== variant {v.name}: {', '.join(VARIANT_STAGES)} in {v.run_dir}", file=out, flush=True)
            link_data(v, out)
            try:
                outcome.variants[v.name] = run_pipeline(v.cfg, only=list(VARIANT_STAGES), run_dir=v.run_dir, out=out,
                                                        force=force)
            except PipelineError as e:
                outcome.failed[v.name] = str(e)
                print(f"! variant {v.name} failed: {e}\n  the other variants go on; rerun `xlp study` to resume it",
                      file=out, flush=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    outcome.report = study_report.update_report(plan, out=out)
    return outcome


def summary_line(outcome: StudyOutcome) -> str:
    ran = sum(s == "ran" for runs in (*outcome.data.values(), *outcome.variants.values()) for s in runs.values())
    return (f"{ran} stage(s) ran, {len(outcome.variants)} variant(s) done, {len(outcome.failed)} failed; "
            f"report {outcome.report}")


def model_vocab(cfg: DictConfig) -> int:
    """model.vocab_size, or tokenizer.vocab_size rounded up to a multiple of 64 as the train stage does."""
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size)
    return -(-int(cfg.tokenizer.vocab_size) // 64) * 64


def print_plan(plan: StudyPlan, config: str, overrides: list[str], out: TextIO) -> None:
    """What `xlp study` would do, and the `xlp run` commands that do the same one step at a time (what to
    give `xlp submit` to run a variant on a cluster: each command then runs in its own job)."""
    import shlex

    from omegaconf import OmegaConf

    from xlp.xlstm_model import count_params

    print(f"study {plan.name}: {len(plan.variants)} variant(s), directory {plan.study_dir}", file=out)
    for data_dir in plan.data_runs:
        print(f"  data: {data_dir} (tokenizer, shard; shared by "
              f"{', '.join(v.name for v in plan.variants if v.data_dir == data_dir)})", file=out)
    for v in plan.variants:
        mcfg = OmegaConf.to_container(v.cfg.model, resolve=True)
        mcfg["vocab_size"] = model_vocab(v.cfg)
        params = count_params(mcfg)
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
    from xlp.pipeline.runner import stage_states
    from xlp.pipeline.stages import STAGES
    from xlp.pipeline.submit import submit_slurm

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
