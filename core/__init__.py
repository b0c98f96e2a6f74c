"""fraudscore's compiled core: pure compute, no I/O on the serving path, no clock, no globals.

Every kernel takes arrays and returns arrays; entity state is an explicit object passed in.
`core` never imports `service`.
"""
