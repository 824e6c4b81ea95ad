"""slab's floor: what every room stands on and nothing it imports from above.

Errors (``errors``), the one set of argument checks (``checks``), atomic outputs and the refusal
of outputs that touch an input (``outputs``), the compute device and AMP (``device``) and the
distributed set-up shared by training and inference (``distributed``). Only the standard
library, numpy and torch are imported here; ``tests/test_layout.py`` keeps it that way.
"""
