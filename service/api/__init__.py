"""The gRPC API: the FraudScoring handlers, call plumbing (metrics, request ids, the one map from
errors to status codes), request validation and health. May import serving/, runtime/, core/."""
