"""``python -m slab.pipeline.cli``: the ``slab`` command (for torchrun and environments without the script)."""
import sys

from slab.pipeline.cli import main

sys.exit(main())
