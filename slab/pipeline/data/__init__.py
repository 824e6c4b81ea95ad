"""Data: dataset adapters (:mod:`.adapters`), datalists (:mod:`.datalist`), the 2.5D slab sampler
(:mod:`.slabs`), slice sequences (:mod:`.sequences`), what a user points slab at (:mod:`.cases`)
and phantoms (:mod:`.phantom`)."""
