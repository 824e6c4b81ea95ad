"""The pipeline rooms, in data-flow order: data → training → inference → evaluation; cli and bundle.

The public API is re-exported by :mod:`slab` (``import slab; slab.Predictor``).
"""
