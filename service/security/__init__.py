"""Transport security and caller authentication: TLS, bearer tokens and the secret files they are
read from. May import runtime/ (settings, metrics, the content-change check of reload) and core/."""
