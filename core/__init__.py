"""fraudscore's compiled core: pure compute, no I/O on the serving path, no clock, no globals.

The request path is at the top (encode → features → forest → rules → scoring, with model,
reasons and identifiers) and may import only itself; offline work has rooms of its own
(history/, offline/). Every kernel takes arrays and returns arrays; entity state is an
explicit object passed in. `core` never imports `service` (tests/test_layout.py checks both).
"""
