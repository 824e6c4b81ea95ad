"""Build of slab's one compiled kernel (the hysteresis flood fill); everything else is in setup.cfg.

The extension is optional: without a C compiler the install still succeeds and
``slab.transforms.post`` falls back to labelling with cc3d (the same output, slower).
"""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension("slab.transforms._fill", ["slab/transforms/_fill.c"], optional=True,
                             extra_compile_args=[] if sys.platform == "win32" else ["-O3"])])
