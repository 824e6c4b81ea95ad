"""The trained model, below training and inference both: its checkpoints (``checkpoints``), the
inference spec each carries (``spec``), the folders and names a model is found by (``folders``)
and the archives that move it between machines (``archive``). Training writes what is here,
inference, ``slab cv``, ``slab export`` and ``slab install`` read it; this room imports neither."""
