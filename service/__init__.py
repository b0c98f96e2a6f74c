"""fraudscore's server: gRPC transport, micro-batcher, pipeline thread, metrics, CLI."""
