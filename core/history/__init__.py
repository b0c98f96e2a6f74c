"""Offline: the columnar history of transactions (table.py), reading it from CSV or Parquet
(read.py, convert.py, times.py), and the simulated world (simulate/). May import the request
path in core/, pyarrow (inside functions) and each other; never service/ or offline/."""
