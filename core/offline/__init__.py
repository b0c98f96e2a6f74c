"""Offline work on histories: replay through the serving kernels, training, the report and its
metrics, rule backtests, progress. May import anything in core/ and LightGBM, pyarrow, matplotlib,
tqdm (inside functions); the request path and service/ never import this room."""
