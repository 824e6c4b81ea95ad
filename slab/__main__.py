"""``python -m slab ...``: the ``slab`` command."""
from slab.pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
