"""The train stage: a DeepSpeed ZeRO training loop."""
