"""Where everything of a run lives: one class names every path of a run directory.

    RUN_DIR/
      config.yaml                 the resolved config of the last `xlp run` (the training ranks read it too)
      .lock                       held while an `xlp run` works here
      .stale/<stage>-<fingerprint>/  an output a changed config or --force replaced (until `xlp clean`)
      submit/                     what `xlp submit` saved: configs, rendered sbatch scripts, job logs
                                  (config-<time>.yaml, config-<time>.sbatch, slurm-<job>.out, ray-<job>.log)
      <stage>/stage.json          a stage's marker (status, fingerprint, times, metrics)
      <stage>/stage.log           its output
      tokenizer/tokenizer.model   the SentencePiece model (tokenizer.vocab: its pieces; stats.json)
      shard/manifest.json         the shards' index; shard/<split>/*.tar the WebDataset shards
      train/checkpoints/          DeepSpeed checkpoints (step_<n>/)
      train/model/                the consolidated model (safetensors + config.json)
      train/metrics.jsonl         one row of metrics per step
      train/result.json           rank 0's summary of the attempt
      train/logs/rank_<r>.log     each rank's output (rank_<r>.error: its error message)
      train/logs/heartbeat_<r>.json  each rank's heartbeat (xlp.pipeline.train.heartbeat)
      eval/                       report.md, plots, results.json (everything), metrics.json (headline)

Stages get their directories from here; no module spells these names itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# File names inside a directory, for the code that gets the directory alone (a stage's dir, a shard
# dir that may be a URL, an exported model dir).
STAGE_JSON = "stage.json"
STAGE_LOG = "stage.log"
MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"


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
        return self.tokenizer_dir / TOKENIZER_MODEL

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
