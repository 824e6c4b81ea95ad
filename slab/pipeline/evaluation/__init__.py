"""Evaluation: metrics (:mod:`.metrics` over the streaming engine :mod:`.surface`), the 3D
hit/miss picture and meshes (:mod:`.render`), cross sections (:mod:`.sections`) and slab
previews (:mod:`.preview`)."""
