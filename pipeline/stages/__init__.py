"""The stages' work, one module each: tokenizer, shard, train, eval. Each module's `run(ctx)` is the
function its declaration in xlp.pipeline.core.registry names; the registry lists them in order."""
