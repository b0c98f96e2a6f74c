"""Transport security and caller authentication: TLS, bearer tokens and the secret files they are
read from. May import runtime/ (settings, logs) and api/ (errors, call counting); never serving/."""
