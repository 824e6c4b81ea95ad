"""The sample volumes slab ships (package data), e.g. ``vessel_phantom/`` that ``slab demo`` reads."""
