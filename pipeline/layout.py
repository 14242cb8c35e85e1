"""Where everything of a run lives: one class names every path of a run directory.

    RUN_DIR/
      config.yaml                 the resolved config of the last `xlp run`
      .lock                       held while an `xlp run` works here
      submit/                     what `xlp submit` saved: configs, rendered sbatch scripts, job logs
      <stage>/stage.json          a stage's marker (status, fingerprint, times, metrics)
      <stage>/stage.log           its output
      tokenizer/tokenizer.model   the SentencePiece model
      shard/manifest.json         the shards' index; shard/<split>/*.tar the WebDataset shards
      train/config.yaml           the config the ranks read
      train/checkpoints/          DeepSpeed checkpoints (step_<n>/)
      train/model/                the consolidated model (safetensors + config.json)
      train/metrics.jsonl         one row of metrics per step
      train/result.json           rank 0's summary of the attempt
      train/logs/rank_<r>.log     each rank's output (rank_<r>.error: its error message)
      eval/                       report.md, plots, eval metrics

Stages get their directories from here; no module spells these names itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    # the run
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def submit_dir(self) -> Path:
        return self.root / "submit"

    # tokenizer
    @property
    def tokenizer_model(self) -> Path:
        return self.stage_dir("tokenizer") / "tokenizer.model"

    # shard
    @property
    def shard_dir(self) -> Path:
        return self.stage_dir("shard")

    @property
    def manifest(self) -> Path:
        return self.shard_dir / "manifest.json"

    # train
    @property
    def train_dir(self) -> Path:
        return self.stage_dir("train")

    @property
    def train(self) -> "TrainLayout":
        return TrainLayout(self.train_dir)

    @property
    def eval_dir(self) -> Path:
        return self.stage_dir("eval")


@dataclass(frozen=True)
class TrainLayout:
    """The train stage's output directory (RUN_DIR/train, or any --out-dir a rank is given)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

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

