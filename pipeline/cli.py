"""`xlp`: the pipeline's command line."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import xlp.pipeline as model_verbs  # export_main, generate_main: loaded on first use (torch)
from xlp.pipeline.cluster.submit import SubmitError, submit_ray, submit_slurm
from xlp.pipeline.core.config import ConfigError, load_config, load_run_config
from xlp.pipeline.core.layout import RunLayout, StudyLayout
from xlp.pipeline.core.node import EXIT_RETRYABLE
from xlp.pipeline.core.preflight import check_run, config_notes
from xlp.pipeline.core.registry import STAGES, stage_names
from xlp.pipeline.core.resources import config_dir, packaged_configs
from xlp.pipeline.core.secrets import redact_config_yaml
from xlp.pipeline.eval.compare import main as compare_main
from xlp.pipeline.runner import CTRL_C, PipelineError, Stopped, clean, human_bytes, run_pipeline, stage_states, stale_outputs
from xlp.pipeline.study.plan import plan_study, print_plan, submit_study
from xlp.pipeline.study.report import update_report
from xlp.pipeline.study.run import run_study, summary_line

DESCRIPTION = """\
xlstm-pipeline: pretrain xLSTM language models from raw corpus to evaluated checkpoint.

A run is a config (YAML + key=value overrides). Its stages write to RUN_DIR/<stage>/; a stage that
is done and unchanged is skipped, a changed one and everything after it reruns.
"""

RUN_EPILOG = """\
overrides are OmegaConf dot-list items, e.g.
  xlp run configs/demo.yaml train.steps=20 model.d_model=256
  xlp run configs/demo.yaml model=xlstm_125m          (picks configs/model/xlstm_125m.yaml)
  xlp run configs/demo.yaml --stages tokenizer,shard --run-dir /tmp/run1
An unknown key or a value of the wrong type is an error that names the key and what is valid.
"""


def build_parser() -> argparse.ArgumentParser:
    stages_help = ", ".join(stage_names()) or "(none registered)"
    parser = argparse.ArgumentParser(
        prog="xlp", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the pipeline's missing or stale stages on this machine (embedded Ray)",
        description="Run the pipeline here: the stages that are missing or stale, in order, each "
        "as a Ray task in an embedded Ray instance (or the cluster in RAY_ADDRESS).",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", metavar="CONFIG", help="run config: a YAML file, or a packaged config's name (`xlp configs`), e.g. demo, tiny")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dot-list)")
    run.add_argument(
        "--stages",
        metavar="A,B",
        help=f"run only these stages (their inputs must be done); stages: {stages_help}",
    )
    run.add_argument("--force", action="store_true", help="rerun the selected stages even if done (their old "
                     "output is kept in RUN_DIR/.stale/ until `xlp clean`)")
    run.add_argument("--run-dir", metavar="DIR", help="run directory (default: the config's run.dir)")

    submit = sub.add_parser(
        "submit",
        help="send the run to a Slurm or Ray cluster (--dry-run: check and print what would be sent)",
        description=_paragraphs(
            "Send the run that `xlp run` would do here to a cluster. The config is checked before anything is "
            "queued. The run directory must be on a filesystem the cluster's nodes share; `xlp status RUN_DIR` "
            "works there while the job runs.",
            "Slurm: before queueing, slurm.* and train.* are checked against each other (e.g. train.device=cpu "
            "with slurm.gpus_per_node>0, fewer CPUs than ranks per node) and against the partition as sinfo "
            "shows it (nodes, CPUs, GPUs and memory per node, largest job, time limit), then with "
            "`sbatch --test-only`; a request that could never start is refused with the key to change and a "
            "value that fits. The training ranks per node are slurm.gpus_per_node (one per GPU), or "
            "train.cpu_processes when it is 0. --wait prints the job's state and pending reason as they change "
            "and fails at once (cancelling the job) when Slurm says it can never start (PartitionConfig, "
            "PartitionNodeLimit, PartitionTimeLimit, ...).",
            "--dry-run checks and prints, queueing nothing: the sbatch script, or the Ray job's entrypoint and "
            "runtime env, and the training launch plan on the allocation the config asks for "
            "(slurm.nodes x slurm.gpus_per_node; for Ray, a cluster of that shape): srun's ranks per node, GPU "
            "binding (LOCAL_RANK), rendezvous (the first node) and environment (train.env over the defaults), "
            "or Ray Train's workers and placement."),
        epilog="examples:\n"
        "  xlp submit configs/demo.yaml model=xlstm_125m --to slurm slurm.partition=gpu slurm.nodes=4 slurm.gpus_per_node=8\n"
        "  xlp submit configs/recipes/xlstm_large_7b.yaml --to slurm --dry-run 'data.sources=[/data/*.jsonl]' slurm.nodes=2\n"
        "  xlp submit configs/demo.yaml --to ray --address http://head:8265 --wait\n"
        "  xlp submit configs/demo.yaml --to slurm --stages eval     (rerun just eval on the cluster)\n"
        "Ray clusters with token authentication: the token in ~/.ray/auth_token or RAY_AUTH_TOKEN is used.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("config", metavar="CONFIG", help="run config: a YAML file or a packaged config's name (`xlp configs`)")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dot-list)")
    submit.add_argument("--to", required=True, choices=("slurm", "ray"), help="the kind of cluster")
    submit.add_argument("--address", metavar="URL", help="Ray: the Jobs API address, e.g. http://head:8265 "
                        "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    submit.add_argument("--wait", action="store_true", help="stream the job's output (Slurm: and its state changes) "
                        "and exit with its status")
    submit.add_argument("--dry-run", action="store_true", help="validate and check, print the job script and the "
                        "training launch plan, queue nothing")
    submit.add_argument("--no-check", action="store_true", help="Slurm: skip the checks against the partition "
                        "(sinfo, sbatch --test-only); the config is still validated")
    submit.add_argument("--stages", metavar="A,B", help=f"run only these stages on the cluster; stages: {stages_help}")
    submit.add_argument("--force", action="store_true", help="rerun the selected stages even if done")
    submit.add_argument("--run-dir", metavar="DIR", help="run directory on the shared filesystem (default: run.dir)")

    study = sub.add_parser(
        "study",
        help="run several variants (models, learning rates, ...) on the same data, and a report comparing them",
        description="Run a study: the config's `study.variants` (each a name and a list of overrides, e.g. "
        "[model=tiny_llama, train.lr=0.002]) on the same tokenizer and shards. The data stages run once, "
        "in STUDY_DIR/data (STUDY_DIR = run.dir); each variant trains and evaluates in STUDY_DIR/<variant>/, "
        "one after the other on this machine; then STUDY_DIR/report.md (with PNGs, and W&B as one group) "
        "compares them: val bits per byte against parameters and tokens seen, loss curves, loss by position "
        "beyond the training length, decode cost and state/KV memory against context, and parameters, "
        "tokens, FLOPs, wall time and throughput per variant. Everything is cached as in `xlp run`: a rerun "
        "does only what is missing or changed. Every variant's config is checked before anything runs. "
        "A failed variant does not stop the others (exit status 1 at the end).",
        epilog="examples:\n"
        "  xlp study configs/studies/xlstm_vs_llama_cpu.yaml\n"
        "  xlp study configs/studies/xlstm_vs_llama_cpu.yaml --variants llama_s,xlstm71_s   (only these)\n"
        "  xlp study configs/studies/xlstm_vs_llama_cpu.yaml train.steps=50 --dry-run        (check, print the plan)\n"
        "  xlp status runs/xlstm_vs_llama_cpu/llama_s                                        (one variant's stages)\n"
        "On Slurm: xlp submit STUDY_CONFIG --to slurm queues the data stages as one job and each variant as a job\n"
        "that waits for it (side by side as the partition has room); then xlp study STUDY_CONFIG --report-only.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_argument("config", metavar="CONFIG", help="study config YAML (a run config with a study: section)")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every variant (before "
                       "each variant's own)")
    study.add_argument("--variants", metavar="A,B", help="run only these variants (the report shows every variant "
                       "that has an eval)")
    study.add_argument("--force", action="store_true", help="rerun the data stages and the variants' train and "
                       "eval even if done (old outputs are kept in each run's .stale/)")
    study.add_argument("--run-dir", metavar="DIR", help="study directory (default: the config's run.dir)")
    study.add_argument("--dry-run", action="store_true", help="check every variant's config and print the plan: "
                       "directories, parameters, and the `xlp run` commands that run it step by step")
    study.add_argument("--report-only", action="store_true", help="only (re)write STUDY_DIR/report.md from the "
                       "variants evaluated so far (e.g. after `xlp submit STUDY_CONFIG --to slurm`)")

    status = sub.add_parser(
        "status",
        help="show each stage of a run: done / stale / running / failed / pending",
        description="Show each stage of a run directory: status (done, stale: done with a different "
        "config; running; failed: raised or was killed; pending: never ran), fingerprint, duration "
        "and headline metrics. Works while a run is in progress, also from another machine that "
        "sees the run directory.",
    )
    status.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds config.yaml)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    clean = sub.add_parser(
        "clean",
        help="delete the outputs a changed config or --force replaced (RUN_DIR/.stale/)",
        description="Delete RUN_DIR/.stale/: the outputs of stages whose config changed (or that were "
        "rerun with --force), which `xlp run` keeps instead of deleting. Prints each and the space it "
        "frees. `xlp status` lists them first. Refused while an `xlp run` uses the run directory.",
    )
    clean.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")

    compare = sub.add_parser(
        "compare",
        help="print the eval stage's headline numbers of several runs side by side",
        description="Print the headline numbers of the eval stage (RUN_DIR/eval/metrics.json) of each "
        "run side by side, e.g. an xLSTM run and the Llama baseline trained on the same shards.",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories with a done eval stage")

    cfg = sub.add_parser(
        "config",
        help="print the resolved, validated config of a run",
        description="Print the resolved config that `xlp run` would use (after defaults, composition, "
        "overrides and interpolation), or fail with the config error.",
    )
    cfg.add_argument("config", metavar="CONFIG")
    cfg.add_argument("overrides", nargs="*", metavar="key=value")

    sub.add_parser(
        "configs",
        help="list the configs that ship with the package (run, recipes, studies; model sizes)",
        description="List the packaged configs. Any command that takes CONFIG accepts one of these names "
        "(`xlp run tiny`, `xlp submit recipes/xlstm_large_7b ...`) or a path to a YAML file; a YAML file of "
        "yours can name the packaged model sizes in its defaults (`defaults: [{model: xlstm_large_400m}]`), "
        "and a model/ folder beside it wins over them.",
    )

    export = sub.add_parser(
        "export",
        help="write a trained model (+ tokenizer) for use outside the pipeline",
        description="Export RUN_DIR's trained model (RUN_DIR/train/model) with its tokenizer. --format hf: "
        "transformers' xLSTM (arch xlstm_large only; AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT)); "
        "--format native: our safetensors + config.json + the run's tokenizer (tokenizer.model or tokenizer.json; "
        "every arch). OUT must not exist or be empty (--force replaces an earlier export there, keeping it as "
        "OUT.replaced-<time>).",
    )
    export.add_argument("source", metavar="RUN_DIR", help="a run directory (or an export directory)")
    export.add_argument("out", metavar="OUT", help="output directory")
    export.add_argument("--format", required=True, choices=("hf", "native"), help="output format")
    export.add_argument("--no-check", action="store_true", help="hf: skip the tokenizer round-trip check")
    export.add_argument("--force", action="store_true", help="OUT holds an earlier export: replace it (the earlier "
                        "one is moved to OUT.replaced-<time>, not deleted)")

    gen = sub.add_parser(
        "generate",
        help="sample a continuation of a prompt, streamed to the terminal",
        description="Sample from RUN_DIR's trained model or an export directory; prints tokens/s to stderr.",
    )
    gen.add_argument("source", metavar="RUN_DIR|EXPORT_DIR")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    gen.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on GPU")
    gen.add_argument("--compile", dest="compile", action="store_true", default=None,
                     help="torch.compile the one-token step (default on GPU, where it costs ~40 s once per "
                          "process and then decodes ~1.8x faster; on CPU it pays off only for long generations)")
    gen.add_argument("--no-compile", dest="compile", action="store_false", help="do not compile the step")
    gen.add_argument("--ignore-eos", action="store_true", help="keep sampling after <eos>")
    gen.add_argument("overrides", nargs="*", metavar="key=value",
                     help="kernels.* and decode.* settings over the run's (e.g. decode.fused=true)")
    return parser


def _paragraphs(*texts: str) -> str:
    """Help text in paragraphs wrapped for a terminal (the parsers keep line breaks as written)."""
    return "\n\n".join(textwrap.fill(t, 100) for t in texts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`xlp run C --stages train train.steps=5`): argparse leaves
    # those to us as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 2

    commands = {"run": cmd_run, "study": cmd_study, "submit": cmd_submit, "status": cmd_status, "clean": cmd_clean, "config": cmd_config,
                "configs": cmd_configs,
                "compare": cmd_compare, "export": cmd_export, "generate": cmd_generate}
    try:
        return commands[args.command](args)
    except (ConfigError, PipelineError, SubmitError) as e:
        print(f"xlp {args.command}: error: {e}", file=sys.stderr)
        if getattr(e, "retryable", False):
            print(f"xlp {args.command}: the cluster failed, not the run: run the same command again to resume "
                  f"(exit status {EXIT_RETRYABLE}; a Slurm job requeues itself)", file=sys.stderr)
            return EXIT_RETRYABLE
        return 1
    except KeyboardInterrupt as e:
        sigterm = isinstance(e, Stopped) and e.args and e.args[0] == "SIGTERM"
        print(f"xlp {args.command}: stopped by {'SIGTERM' if sigterm else CTRL_C}; "
              "run the same command again to resume", file=sys.stderr)
        return 143 if sigterm else 130


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    only = _stage_list(args.stages)
    if cfg.study.variants:
        print(f"note: {args.config} is a study ({len(cfg.study.variants)} variants); `xlp run` runs its config without "
              f"any variant's overrides: `xlp study {args.config}` runs the variants", file=sys.stderr)
    # the user's command without --stages/--force: hints that name a command to run keep their overrides
    rerun = ["xlp", "run", args.config, *args.overrides] + (["--run-dir", args.run_dir] if args.run_dir else [])
    run_pipeline(cfg, only=only, force=args.force, run_dir=args.run_dir, rerun=rerun)
    return 0


def cmd_study(args) -> int:
    plan = plan_study(args.config, args.overrides, study_dir=args.run_dir)  # every variant checked here
    only = [s.strip() for s in args.variants.split(",") if s.strip()] if args.variants else None
    if args.dry_run:
        print_plan(plan, args.config, args.overrides, sys.stdout)
        return 0
    if args.report_only:
        update_report(plan, out=sys.stdout)
        return 0
    outcome = run_study(plan, force=args.force, only=only, out=sys.stdout)
    print(f"study {plan.name}: {summary_line(outcome)}; {StudyLayout(plan.study_dir).report}")
    if outcome.failed:
        print(f"xlp study: error: variant(s) failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return 1
    return 0


def _stage_list(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    only = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in only if s not in stage_names()]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(stage_names())}")
    return only


def cmd_submit(args) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before anything is queued
    if cfg.study.variants:  # a study: its data stages and each variant as jobs of their own

        if args.to != "slurm" or args.stages or args.wait:
            raise SubmitError("a study config (study.variants) is submitted with `--to slurm` only, without --stages "
                              "or --wait (one job per variant; `xlp status STUDY_DIR/<variant>` follows each). On a "
                              "Ray cluster, run `xlp study CONFIG` with RAY_ADDRESS set: its stages run there")
        plan = plan_study(args.config, args.overrides, study_dir=args.run_dir)  # every variant checked first
        return submit_study(plan, out=sys.stdout, dry_run=args.dry_run, check=not args.no_check, force=args.force)
    only = _stage_list(args.stages)
    check_run(cfg, only or stage_names())  # what cannot work is refused before anything is queued
    run_dir = Path(args.run_dir or cfg.run.dir).absolute()
    kw = dict(run_dir=run_dir, only=only, force=args.force, wait=args.wait, out=sys.stdout, dry_run=args.dry_run)
    if args.to == "slurm":
        return submit_slurm(cfg, check=not args.no_check, **kw)
    return submit_ray(cfg, address=args.address, **kw)


def cmd_compare(args) -> int:
    return compare_main(list(args.run_dirs))


def cmd_export(args) -> int:
    return model_verbs.export_main(args)


def cmd_generate(args) -> int:
    return model_verbs.generate_main(args)


def cmd_configs(args) -> int:
    root = config_dir()
    print(f"configs shipped in {root} (use the name, e.g. `xlp run tiny`):")
    for name in packaged_configs():
        print(f"  {name}")
    models = sorted(p.stem for p in (root / "model").glob("*.yaml"))
    print(f"model sizes (`model=NAME` or `defaults: [{{model: NAME}}]`): {', '.join(models)}")
    return 0


def cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(redact_config_yaml(cfg), end="")  # terminals get logged too
    for note in config_notes(cfg):  # on stderr: stdout stays the YAML, for files and pipes
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    run_dir = Path(args.run_dir)
    cfg = load_run_config(RunLayout(run_dir).config)  # a damaged config.yaml: an error naming it
    states = stage_states(STAGES, cfg, run_dir)
    headline = {s.name: s.headline for s in STAGES}
    if args.json:
        print(json.dumps({s.name: {**s.marker, "status": s.status, "fingerprint": s.fingerprint} for s in states}, indent=2, default=str))
        return 0
    rows = [("STAGE", "STATUS", "FINGERPRINT", "DURATION", "METRICS")]
    for s in states:
        metrics = s.marker.get("metrics", {})
        keys = [k for k in headline[s.name] if k in metrics] or list(metrics)[:3]
        shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys)
        if s.damaged:  # the whole reason: it names the file
            shown = s.damaged
        elif s.status == "failed" and s.marker.get("error"):
            shown = s.marker["error"].splitlines()[-1][:80]
        elif s.status == "running":
            shown = f"started {time.strftime('%H:%M:%S', time.localtime(s.marker['started_at']))} on {s.marker.get('host')}"
        duration = _duration(s.marker.get("duration_s"))
        rows.append((s.name, s.status, s.fingerprint, duration, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"run dir: {run_dir.resolve()}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if any(s.damaged for s in states):
        print(f"damaged run files are not deleted: `xlp run CONFIG --run-dir {args.run_dir}` resumes those stages "
              "(what they finished is checked and kept)")
    stale = stale_outputs(run_dir)
    if stale:
        print(f"kept outputs a changed config replaced ({human_bytes(sum(n for _, n in stale))}; "
              f"`xlp clean {args.run_dir}` deletes them):")
        for path, size in stale:
            print(f"  {path.name}  {human_bytes(size)}")
    return 0


def cmd_clean(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"xlp clean: error: {run_dir} is not a directory", file=sys.stderr)
        return 2
    clean(run_dir, sys.stdout)
    return 0


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


if __name__ == "__main__":
    sys.exit(main())
