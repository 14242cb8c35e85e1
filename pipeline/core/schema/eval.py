"""Config section of the eval stage: `eval.*`.

Every field is a config key (`eval.ppl_batches=4` on the command line). `validate()` raises
ValueError naming the key (`eval.<key>`); the pipeline config turns that into a ConfigError.
Sizes are chosen for a real run on a GPU; configs/demo.yaml shrinks them to run in about a minute on
a laptop CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from xlp.pipeline.core.resources import config_dir

PARTS = ("ppl", "long_context", "generation", "recall", "lm_eval")
DEVICES = ("auto", "cpu", "cuda")
BUNDLED_TASKS = ("xlp_cloze", "xlp_cloze_mc", "xlp_cloze_gen", "xlp_heldout")
CONFIG_EVAL_DIR = config_dir() / "eval"  # the packaged lm-eval task files


def local_task_files() -> dict[str, Path]:
    """{task name: YAML file} of the lm-eval task definitions in configs/eval/ (the offline tasks)."""
    out = {}
    for p in sorted(CONFIG_EVAL_DIR.glob("*.yaml")):
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and "task" in data:
            out[str(data["task"])] = p
    return out


@dataclass
class EvalConfig:
    # which evaluations run (and so which sections report.md has); any subset of PARTS
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    device: str = "auto"  # auto (cuda when there is a GPU, else cpu) | cpu | cuda
    threads: int = 0  # torch CPU threads (0: every core of this machine)
    seed: int = 0  # synthetic prompts (recall, generation cost) and cloze item selection

    # --- held-out perplexity and bits per byte (val split, packed rows of data.seq_len) ---
    batch_size: int = 8  # rows per forward pass (perplexity, long context)
    ppl_batches: int = 32  # batches of the val split (0: the whole split, one epoch)
    baseline: bool = True  # also score an untrained model of the same config and seed

    # --- long context: loss by position at multiples of the training length ---
    context_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    long_context_tokens: int = 262144  # tokens scored per multiplier (rounded to whole rows)
    # lower edges of the position buckets (position = tokens of context the prediction had, counted
    # from the document's start or the row's start); empty: 0 and powers of two from 16 on
    position_buckets: list[int] = field(default_factory=list)

    # --- generation cost at batch 1: prefill a prompt of each length, then time decode steps ---
    gen_contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    gen_tokens: int = 64  # timed decode steps per context in each round (after 2 untimed ones)
    # rounds of decode timing, the contexts interleaved (order rotated each round): the report shows
    # each context's median and its fastest/slowest round, so machine noise cannot pass for a trend
    gen_repeats: int = 5
    prefill_chunk: int = 2048  # the prompt is read in chunks of this many tokens (bounded memory)

    # --- MQAR-style associative recall (synthetic, zero-shot) ---
    recall_pairs: list[int] = field(default_factory=lambda: [8, 32, 128, 256])
    recall_queries: int = 32  # queries per sequence (at most the number of pairs)
    recall_trials: int = 64  # sequences per number of pairs
    recall_batch_size: int = 16

    # --- lm-evaluation-harness ---
    tasks: list[str] = field(default_factory=lambda: list(BUNDLED_TASKS))
    lm_eval_limit: int = 200  # documents per task (0: all)
    lm_eval_batch_size: int = 16
    lm_eval_max_length: Optional[int] = None  # tokens of context the model sees (None: data.seq_len)
    # Offline (default): no hub access; only tasks from local files (the bundled configs/eval/
    # tasks, built from the val split). false: hub tasks (e.g. hellaswag) may download data.
    lm_eval_offline: bool = True
    cloze_items: int = 500  # cloze items built from val documents for the bundled tasks
    cloze_context_chars: int = 1500  # characters of document before the line to predict

    # --- report ---
    plots: bool = True  # PNG plots in RUN_DIR/eval/ and the report (and W&B when it is on)

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"config key `eval.{key}` {msg}")

        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise bad("parts", f"has unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
        if self.device not in DEVICES:
            raise bad("device", f"is {self.device!r}; valid values: {', '.join(DEVICES)}")
        for key in ("batch_size", "gen_tokens", "gen_repeats", "prefill_chunk", "recall_queries", "recall_trials",
                    "recall_batch_size", "lm_eval_batch_size", "cloze_items", "cloze_context_chars",
                    "long_context_tokens"):
            if getattr(self, key) < 1:
                raise bad(key, f"is {getattr(self, key)}; must be >= 1")
        for key in ("threads", "ppl_batches", "lm_eval_limit"):
            if getattr(self, key) < 0:
                raise bad(key, f"is {getattr(self, key)}; must be >= 0 (0: {'all' if key != 'threads' else 'every core'})")
        for key, part in (("context_multipliers", "long_context"), ("gen_contexts", "generation"),
                          ("recall_pairs", "recall")):
            values = list(getattr(self, key))
            if not values and part in self.parts:
                raise bad(key, f"is empty while eval.parts has {part}")
            if any(v < 1 for v in values):
                raise bad(key, f"is {values}; every value must be >= 1")
        if any(v < 2 for v in self.gen_contexts):
            raise bad("gen_contexts", f"is {list(self.gen_contexts)}; prompts need >= 2 tokens")
        edges = list(self.position_buckets)
        if edges and (edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise bad("position_buckets", f"is {edges}; must start at 0 and increase, e.g. [0, 64, 256, 1024]")
        if self.lm_eval_max_length is not None and self.lm_eval_max_length < 2:
            raise bad("lm_eval_max_length", f"is {self.lm_eval_max_length}; must be >= 2 or null")
        if "lm_eval" in self.parts and not self.tasks:
            raise bad("tasks", "is empty while eval.parts has lm_eval; name tasks or drop lm_eval from eval.parts")
        if self.lm_eval_offline and "lm_eval" in self.parts:
            local = local_task_files()
            hub = [t for t in self.tasks if t not in local]
            if hub:
                raise bad("tasks", f"names task(s) {hub} that are not defined in configs/eval/ while "
                          f"eval.lm_eval_offline is true; offline only local-file tasks run "
                          f"({', '.join(local)}); set eval.lm_eval_offline=false for hub tasks")
