"""The errors a run reports to its user: each message names what was wrong and what to do."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, where it came from, and the fix."""


class PipelineError(RuntimeError):
    """A run that cannot go on; the message says which stage and what to do. `retryable`: the stage
    failed because of the cluster (xlp.pipeline.core.node.RetryableFault), and a rerun resumes."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable
