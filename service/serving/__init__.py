"""Serving a request: the micro-batcher and its timer, the pipeline thread's one call into core/,
idempotency records, warm-up, the challenger in shadow. May import core/, api/ errors and runtime/
settings and metrics."""
