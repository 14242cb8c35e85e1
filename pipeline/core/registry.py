"""The pipeline's stages, declared: the config keys each reads (its fingerprint), the stages it needs,
its function as an import string (run where the stage runs: a Ray task, a Slurm job), in the order
they run. Declarations only: importing the registry imports no stage's code, so the runner, a
training rank and `xlp status` read it cheaply. The stage functions live in xlp.pipeline.stages."""
from __future__ import annotations

from xlp.pipeline.core.layout import MANIFEST
from xlp.pipeline.core.stage import Stage


# Read by both data stages, hashed otherwise or changing nothing they write: data.mixture's groups
# (the name and the sources of each) are in the corpus listing (Stage.inputs), its weights are the
# train stage's; data.num_workers is how many Ray tasks run at once (the sample and the shards are
# the same for any number).
DATA_SEES = ("data.mixture", "data.num_workers")


# What every stage may read without hashing it: where its metrics go (W&B), the run's name there, and
# where the run directory is.
MONITORING = ("wandb", "run.name", "run.dir")


# ---- tokenizer
TOKENIZER_READS = (
    "data.sources", "data.format", "data.text_field", "data.on_error", "data.max_doc_bytes",
    "tokenizer.vocab_size", "tokenizer.path", "tokenizer.type", "tokenizer.byte_fallback",
    "tokenizer.character_coverage", "tokenizer.sample_bytes", "tokenizer.heldout_bytes", "tokenizer.seed",
)
TOKENIZER = Stage(
    name="tokenizer",
    reads=TOKENIZER_READS,
    needs=(),
    fn="xlp.pipeline.stages.tokenizer:run",
    resumable=False,
    headline=("vocab_size", "chars_per_token", "docs_read", "sample_docs"),
    description="train SentencePiece on a uniform sample of the corpus (or take tokenizer.path)",
    # the corpus files (path, size, mtime) and the content of tokenizer.path: pipeline/data/listing.py
    inputs=("xlp.pipeline.data.listing:corpus", "xlp.pipeline.data.listing:tokenizer_file"),
    # SentencePiece's threads give the same model; the partitions concatenate their samples in corpus
    # order, so the sample is the same for any data.partition_bytes
    sees=DATA_SEES + ("tokenizer.num_threads", "data.partition_bytes"),
)


# ---- shard
SHARD_READS = (
    "data.sources", "data.format", "data.text_field", "data.on_error", "data.dedup", "data.val_fraction",
    "data.max_doc_bytes",
    "data.partition_bytes", "data.shard_bytes", "data.sample_tokens",
    # the ids are SentencePiece's either way on the sample each partition checks; hashed all the same, as
    # nothing proves them equal on the documents after it
    "data.encoder",
)
SHARD = Stage(
    name="shard",
    reads=SHARD_READS,
    needs=("tokenizer",),
    fn="xlp.pipeline.stages.shard:run",
    resumable=True,
    headline=("tokens", "shards", "docs_kept", "docs_empty", "files_skipped", "bad_records"),
    description="tokenize the corpus into WebDataset tar shards + manifest.json (Ray tasks)",
    inputs=("xlp.pipeline.data.listing:corpus",),  # the corpus files (path, size, mtime); the model is upstream
    sees=DATA_SEES,
    # the manifest every reader starts from: its sha256 in the done marker; a damaged one makes the stage
    # failed, and its rerun keeps the shards (checked against their records) and writes the manifest again
    outputs=(MANIFEST,),
    check="xlp.pipeline.data.manifest:manifest_problem",  # markers written before they recorded its sha256
)


# ---- train
TRAIN = Stage(
    name="train",
    # wandb.* is read at run time but not hashed: monitoring settings change no result
    # the rows of each step: data.seq_len, data.streams, data.mixture's weights and phases, run.seed
    # (xlp.pipeline.data.order) and the global batch
    # and which shards a damaged one leaves out (data.on_error: fail, or skip it)
    reads=("model", "train", "data.seq_len", "data.streams", "data.mixture", "data.mixture_phases", "run.seed",
           "kernels", "data.on_error"),
    # where the ranks run (and their transport settings, train.env), how often they log, validate and
    # save, what they keep and where (train.checkpoint_dir), how long a rank may hang or how often it
    # restarts, and the loader's worker processes (the global order does not depend on them) change
    # nothing the stage's training computes
    ignores=("train.launcher", "train.device", "train.log_every", "train.save_every", "train.keep_checkpoints",
             "train.checkpoint_dir", "train.eval_every", "train.eval_batches", "train.threads", "train.peak_tflops",
             "train.num_workers", "train.env", "train.hang_timeout", "train.max_restarts"),
    # a longer (or shorter) run of the same trajectory continues from the checkpoints already there; so
    # does one on another number of ranks or micro-batch split of the same global batch (the ranks refuse
    # one whose global batch differs from its checkpoint's: pipeline/train/elastic.py), and one whose
    # mixture phases changed (from the checkpoint on, the new weights apply), and one that now skips (or no
    # longer skips) damaged shards (data.on_error, hashed since 2026-12-07: runs trained before continue)
    continues=("train.steps", "train.resume_from_step", "train.cpu_processes", "train.sequence_parallel", "train.grad_accum",
               "train.micro_batch_size", "data.mixture_phases", "data.on_error"),
    needs=("tokenizer", "shard"),
    fn="xlp.pipeline.stages.train:run",
    resumable=True,
    headline=("final_loss", "val_loss", "tokens_per_s", "mfu", "skipped_steps"),
    description="DeepSpeed ZeRO training (gloo ranks on CPU, one rank per GPU); checkpoints, W&B",
    inputs=("xlp.pipeline.data.listing:init_from",),  # the model.init_from checkpoint's files (listing.py)
    sees=MONITORING,
    added=("train.exp_decay_steps",),  # the exp schedule's (2026-12): null unless it is used
)


# ---- eval
# wandb.* is read at run time but not hashed; kernels.* chooses the kernels the model runs with.
# decode.* is not read: the generation-cost measurement steps the model itself, not the decoder.
EVAL_READS = ("eval", "data.seq_len", "run.seed", "kernels")
EVAL_HEADLINE = ("val_bpb", "untrained_bpb", "val_ppl", "loss_beyond_train_len", "recall_acc", "gen_decode_tok_s_max_ctx")
EVAL = Stage(
    name="eval",
    reads=EVAL_READS,
    needs=("tokenizer", "shard", "train"),
    fn="xlp.pipeline.stages.eval:run",
    resumable=False,
    headline=EVAL_HEADLINE,
    description="held-out ppl/bpb, long context, generation cost, recall, lm-eval; report.md + plots",
    sees=MONITORING,
)


STAGES: list[Stage] = [TOKENIZER, SHARD, TRAIN, EVAL]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
