"""`xlp study`, running: the data stages once per data directory, then each variant's train and eval
on this machine, then the report (xlp.pipeline.study.report)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, TextIO

from xlp.pipeline.core.errors import PipelineError
from xlp.pipeline.runner import _disconnect_ray, _ensure_ray, run_pipeline
from xlp.pipeline.study.plan import DATA_STAGES, VARIANT_STAGES, StudyPlan, link_data
from xlp.pipeline.study.report import update_report



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
            _disconnect_ray()
    outcome.report = update_report(plan, out=out)
    return outcome


def summary_line(outcome: StudyOutcome) -> str:
    ran = sum(s == "ran" for runs in (*outcome.data.values(), *outcome.variants.values()) for s in runs.values())
    return (f"{ran} stage(s) ran, {len(outcome.variants)} variant(s) done, {len(outcome.failed)} failed; "
            f"report {outcome.report}")
