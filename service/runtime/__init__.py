"""The running process: settings, wiring the parts together (app.py), the gRPC server and its
signals, rules and model reload, state restore and snapshots, metrics and logs. May import all of service/ and core/."""
