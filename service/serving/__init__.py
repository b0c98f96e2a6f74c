"""Serving a request: the micro-batcher and its timer, the pipeline thread's one call into core/,
idempotency records, the challenger in shadow. May import core/ and runtime/ metrics and config."""
