"""Rules on the request path: the ruleset and its decisions (ruleset.py), the rules file (file.py),
the decision kernel (kernel.py), named lists (named_lists.py) and the expression language (lang/).
May import numpy, numba and the rest of the request path in core/; never history/ or offline/."""
