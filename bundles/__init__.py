"""The MONAI bundles slab ships (package data: ``configs/``, ``models/``, ``docs/`` of each)."""
