"""Reading and writing volumes: one room for every file format slab reads and writes.

``slab.io.volumes`` is the public face (``load_volume``, ``save_volume``, ``volume_info``,
``output_format``); the other modules are the format families behind it.
"""
