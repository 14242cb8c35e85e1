"""Where everything of a run lives: one class names every path of a run directory.

    RUN_DIR/
      config.yaml                 the resolved config of the last `xlp run` (the training ranks read it too)
      .lock                       held while an `xlp run` works here
      .stale/<stage>-<fingerprint>/  an output a changed config or --force replaced (until `xlp clean`)
      submit/                     what `xlp submit` saved: configs, rendered sbatch scripts, job logs
                                  (config-<time>.yaml, config-<time>.sbatch, slurm-<job>.out, ray-<job>.log)
      <stage>/stage.json          a stage's marker (status, fingerprint, times, metrics)
      <stage>/stage.log           its output
      tokenizer/tokenizer.model   the SentencePiece model (tokenizer.vocab: its pieces; stats.json), or
      tokenizer/tokenizer.json    a Hugging Face tokenizer (tokenizer.path; tokenizer_config.json: its
                                  special tokens' roles, when a config gave them)
      shard/manifest.json         the shards' index; shard/<split>/*.tar the WebDataset shards
      train/checkpoints/          DeepSpeed checkpoints (step_<n>/); a link to train.checkpoint_dir when
                                  that is set (check_train_paths: no other link out of the run dir)
      train/model/                the consolidated model (safetensors + config.json)
      train/metrics.jsonl         one row of metrics per step
      train/result.json           rank 0's summary of the attempt
      train/logs/rank_<r>.log     each rank's output (rank_<r>.error: its error message)
      train/logs/heartbeat_<r>.json  each rank's heartbeat (xlp.pipeline.train.heartbeat)
      eval/                       report.md, plots, results.json (everything), metrics.json (headline)

Stages get their directories from here; no module spells these names itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xlp.pipeline.core.errors import PipelineError

# File names inside a directory, for the code that gets the directory alone (a stage's dir, a shard
# dir that may be a URL, an exported model dir).
STAGE_JSON = "stage.json"
STAGE_LOG = "stage.log"
MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# written by `xlp run` into a running stage's folder to ask its task to wind down; it holds what asked
# (e.g. "Ctrl-C (SIGINT)"), which the train ranks then name instead of the SIGTERM their launcher sends
STOP_REQUESTED = ".stop-requested"
CTRL_C = "Ctrl-C (SIGINT)"  # how a stop by the terminal's interrupt is named, everywhere


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def stage_json(self, stage: str) -> Path:
        return self.stage_dir(stage) / STAGE_JSON

    def stage_log(self, stage: str) -> Path:
        return self.stage_dir(stage) / STAGE_LOG

    # the run
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def stale_dir(self) -> Path:
        """Outputs a changed config (or --force) replaced, kept until `xlp clean`."""
        return self.root / ".stale"

    def stale_output(self, stage: str, fingerprint: str) -> Path:
        return self.stale_dir / f"{stage}-{fingerprint}"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def submit_dir(self) -> Path:
        return self.root / "submit"

    def submitted_config(self, stamp: str) -> Path:
        return self.submit_dir / f"config-{stamp}.yaml"

    def slurm_log(self, job_id: str) -> Path:
        """The Slurm job's output (job_id "%j" gives the pattern sbatch fills in)."""
        return self.submit_dir / f"slurm-{job_id}.out"

    def ray_log(self, job_id: str) -> Path:
        """The output of the Ray processes a Slurm job starts."""
        return self.submit_dir / f"ray-{job_id}.log"

    # tokenizer
    @property
    def tokenizer_dir(self) -> Path:
        return self.stage_dir("tokenizer")

    @property
    def tokenizer_model(self) -> Path:
        """The run's tokenizer file: tokenizer.json where the stage wrote a Hugging Face tokenizer, else
        tokenizer.model (the stage writes one of them into an emptied directory)."""
        hf = self.tokenizer_dir / TOKENIZER_JSON
        return hf if hf.is_file() else self.tokenizer_dir / TOKENIZER_MODEL

    @property
    def tokenizer_vocab(self) -> Path:
        return self.tokenizer_dir / "tokenizer.vocab"

    @property
    def tokenizer_stats(self) -> Path:
        return self.tokenizer_dir / "stats.json"

    # shard
    @property
    def shard_dir(self) -> Path:
        return self.stage_dir("shard")

    @property
    def manifest(self) -> Path:
        return self.shard_dir / MANIFEST

    # train
    @property
    def train_dir(self) -> Path:
        return self.stage_dir("train")

    @property
    def train(self) -> "TrainLayout":
        return TrainLayout(self.train_dir)

    # eval
    @property
    def eval_dir(self) -> Path:
        return self.stage_dir("eval")

    @property
    def eval_results(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def eval_report(self) -> Path:
        return self.eval_dir / "report.md"

    @property
    def lm_eval_dir(self) -> Path:
        return self.eval_dir / "lm_eval"


@dataclass(frozen=True)
class TrainLayout:
    """The train stage's output directory (RUN_DIR/train, or any --out-dir a rank is given)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank_{rank}.log"

    def rank_error(self, rank: int) -> Path:
        return self.logs / f"rank_{rank}.error"

    def heartbeat(self, rank: int) -> Path:
        return self.logs / f"heartbeat_{rank}.json"

    @property
    def stop_request(self) -> Path:
        return self.root / STOP_REQUESTED

    def stop_reason(self) -> Optional[str]:
        """What asked `xlp run` to stop this stage, as its stop request says; None without one."""
        try:
            return self.stop_request.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None


@dataclass(frozen=True)
class StudyLayout:
    """Where everything of a study (`xlp study`, pipeline/study/) lives:

        STUDY_DIR/
          data/                 a run directory with the data stages the variants share (tokenizer, shard)
          data-<fp>/            the same for variants whose overrides change the data stages
          <variant>/            a variant's run directory (tokenizer/ and shard/ link to its data directory)
          report.md, *.png      the study report and its plots
          report.json           its numbers and the fingerprint they were made from
          wandb/                the report's W&B run
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def data_dir(self, shard_fingerprint: str | None = None) -> Path:
        """The shared data directory, or (given a fingerprint) one for variants with other data stages."""
        return self.root / ("data" if shard_fingerprint is None else f"data-{shard_fingerprint[:8]}")

    def variant_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    def plot(self, name: str) -> Path:
        return self.root / name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def leads_out(run_root: Path, path: Path) -> Optional[Path]:
    """Where `path`, a path in the run directory, really is when a symlink on the way takes it out of
    the run directory (None when it stays inside, or is not there)."""
    if not os.path.lexists(path):
        return None
    real = _real(path)
    return None if _inside(real, _real(run_root)) else real


def check_stale_dir(layout: RunLayout) -> Path:
    """RUN_DIR/.stale, refused (PipelineError) when a symlink takes it out of the run directory: outputs
    moved there would land in another folder, and `xlp clean` would delete what is there."""
    real = leads_out(layout.root, layout.stale_dir)
    if real is not None:
        raise PipelineError(
            f"{layout.stale_dir} leads out of the run directory {layout.root} through a symlink (to {real}): "
            "replaced outputs would be moved there and `xlp clean` would delete what that folder holds. Remove the "
            f"link (`rm {layout.stale_dir}`); the run makes a folder of its own")
    return layout.stale_dir


def check_train_paths(run_root: Path, out: TrainLayout, checkpoint_dir: Optional[str], *,
                      create: bool = False) -> None:
    """Refuse a train output that a symlink takes out of the run directory: the run writes its
    checkpoints there, prunes old ones and resumes the newest, so a link to another run's folder would
    make that run's checkpoints this run's. Checked: RUN_DIR/.stale (check_stale_dir), the train
    folder, its checkpoints folder and each entry in it (an entry may not lead out of the checkpoints
    folder). `checkpoint_dir` (train.checkpoint_dir) is the one place outside that the user names
    explicitly: the checkpoints folder is then a link to it (made here when `create` and there is none
    yet, or in place of an empty folder). An out_dir outside the run directory (a rank's --out-dir) is
    its own root. Raises PipelineError naming the path, where it leads and the fix."""
    run_root, root = Path(os.path.abspath(run_root)), Path(os.path.abspath(out.root))
    check_stale_dir(RunLayout(run_root))  # where a resume sets damaged or superseded checkpoints aside
    base = run_root if _inside(root, run_root) else root
    if root != base and leads_out(base, root) is not None:
        raise PipelineError(
            f"{root} leads out of the run directory {base} through a symlink (to {_real(root)}): this run would "
            "write its checkpoints and model there, prune and resume what it finds as its own. Remove the link "
            f"(`rm {root}`) to keep the train stage's output in the run directory; to keep checkpoints "
            "elsewhere, set train.checkpoint_dir=PATH")
    folder = root / "checkpoints"
    if checkpoint_dir:
        target = Path(checkpoint_dir).expanduser()
        if not os.path.lexists(folder) or (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
            if create:  # an empty folder holds nothing to lose
                if os.path.lexists(folder):
                    folder.rmdir()
                target.mkdir(parents=True, exist_ok=True)
                root.mkdir(parents=True, exist_ok=True)
                os.symlink(target, folder)
        elif not (folder.is_symlink() and _real(folder) == _real(target)):
            now = f"a link to {os.readlink(folder)}" if folder.is_symlink() else "a folder of the run directory"
            raise PipelineError(
                f"train.checkpoint_dir is {target}, but {folder} is {now}: the run would not know which checkpoints "
                f"are its own. Move the checkpoints you want this run to continue from into {target} and remove "
                f"{folder} (the run links it to {target}), or unset train.checkpoint_dir")
        real_folder = _real(target)
    else:
        real_folder = _real(folder)
        if leads_out(base, folder) is not None:
            raise PipelineError(
                f"{folder} leads out of the run directory {base} through a symlink (to {real_folder}): checkpoints "
                "there may be another run's, and this run would write, prune and resume them as its own. Remove "
                f"the link (`rm {folder}`) to keep this run's checkpoints in the run directory, or, if {real_folder} "
                f"is where this run's checkpoints belong, set train.checkpoint_dir={real_folder}")
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_symlink() and not _inside(_real(entry), real_folder):
                raise PipelineError(
                    f"{entry} is a symlink that leads out of the checkpoints folder (to {_real(entry)}): this run "
                    "would resume or prune it as its own checkpoint. Remove the link, or copy the checkpoint in "
                    "if it is this run's")
