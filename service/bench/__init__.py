"""`fraudscore bench`: the kernels against their references (compute.py), the service against a
bare gRPC server (serve.py) and the load generator both use (loadgen.py). Offline: never imported by serve."""
