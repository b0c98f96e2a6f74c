"""Offline: the columnar history of transactions (table.py, validate.py), reading it from CSV or
Parquet (read.py, read_report.py, convert.py, times.py), and the simulated world (simulate/). May
import the request path in core/, pyarrow (inside functions), each other and offline.progress; never service/."""
