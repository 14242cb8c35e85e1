"""The pipeline's stages, in the order they run. Each names the config keys it reads."""
from __future__ import annotations

from pipeline.stage import Stage

STAGES: list[Stage] = [
    Stage(
        name="tokenizer",
        # keep in sync with pipeline/stages/tokenizer.py:READS (a test checks)
        reads=(
            "data.sources", "data.format", "data.text_field", "data.on_error",
            "tokenizer.vocab_size", "tokenizer.path", "tokenizer.type", "tokenizer.byte_fallback",
            "tokenizer.character_coverage", "tokenizer.sample_bytes", "tokenizer.heldout_bytes",
            "tokenizer.seed",
        ),
        needs=(),
        fn="pipeline.stages.tokenizer:run",
        resumable=False,
        headline=("vocab_size", "chars_per_token", "docs_read", "sample_docs"),
        description="train SentencePiece on a uniform sample of the corpus (or take tokenizer.path)",
    ),
    Stage(
        name="shard",
        # keep in sync with pipeline/stages/shard.py:READS (a test checks)
        reads=(
            "data.sources", "data.format", "data.text_field", "data.on_error", "data.dedup",
            "data.val_fraction", "data.partition_bytes", "data.shard_bytes", "data.sample_tokens",
        ),
        needs=("tokenizer",),
        fn="pipeline.stages.shard:run",
        resumable=True,
        headline=("tokens", "shards", "docs_kept", "docs_empty", "files_skipped", "bad_records"),
        description="tokenize the corpus into WebDataset tar shards + manifest.json (Ray tasks)",
    ),
    Stage(
        name="train",
        # wandb.* is read at run time but not hashed: monitoring settings change no result
        reads=("model", "train", "data.seq_len", "run.seed", "kernels"),
        # where the ranks run and how often the console prints change no result
        ignores=("train.launcher", "train.log_every"),
        needs=("tokenizer", "shard"),
        fn="pipeline.stages.train:run",
        resumable=True,
        headline=("final_loss", "val_loss", "tokens_per_s", "mfu", "skipped_steps"),
        description="DeepSpeed ZeRO training (gloo ranks on CPU, one rank per GPU); checkpoints, W&B",
    ),
    Stage(
        name="eval",
        # keep in sync with pipeline/stages/eval.py:READS (a test checks); wandb.* is read at run
        # time but not hashed
        reads=("eval", "data.seq_len", "run.seed"),
        needs=("tokenizer", "shard", "train"),
        fn="pipeline.stages.eval:run",
        resumable=False,
        headline=("val_bpb", "untrained_bpb", "val_ppl", "loss_beyond_train_len", "recall_acc",
                  "gen_decode_tok_s_max_ctx"),
        description="held-out ppl/bpb, long context, generation cost, recall, lm-eval; report.md + plots",
    ),
]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
