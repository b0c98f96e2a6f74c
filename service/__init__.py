"""fraudscore's server and its tools, in rooms by stage: api/ (gRPC handlers and plumbing),
serving/ (batcher, pipeline, idempotency), security/, runtime/ (wiring, settings, reload, state
restore, metrics, logs), cli/ and bench/. May import core/; core/ never imports this."""
