"""Post-processing of probability maps and masks: threshold, hysteresis flood fill, region
growing, connected components, holes, ROI.

Every transform takes one item, a ``(L, X, Y, Z)`` volume (each label processed on its own) or
an ``(X, Y, Z)`` volume, as a numpy array, torch tensor or MetaTensor, and returns the same type
with the same meta (affine included). Masks come out as ``uint8`` 0/1. Transforms that need a
binary mask accept bool or 0/1 values of any dtype and raise :class:`SlabError` on anything else.

Connectivity is 6 (faces), 18 (+ edges) or 26 (+ corners); scikit-image and scipy call these
1, 2 and 3. :func:`postprocess` (and :class:`Postprocess`) is the one composition the CLI,
inference and bundles use: ROI, threshold or hysteresis, small components, largest components,
holes, in that order.

The room in three modules, as MONAI lays out its transforms: :mod:`.functional` (the kernels on one
volume), :mod:`.array` (the transforms and the chain) and :mod:`.dictionary` (their dictionary
forms); every name is importable from ``slab.transforms.post``.
"""
from slab.transforms.post.array import *  # noqa: F401,F403
from slab.transforms.post.array import __all__ as _array
from slab.transforms.post.dictionary import *  # noqa: F401,F403
from slab.transforms.post.dictionary import __all__ as _dictionary
from slab.transforms.post.functional import *  # noqa: F401,F403
from slab.transforms.post.functional import _compiled_fill  # noqa: F401 - None where the C fill is not built
from slab.transforms.post.functional import __all__ as _functional

__all__ = sorted({*_array, *_dictionary, *_functional})
