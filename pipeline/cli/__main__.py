"""``python -m pipeline.cli``: the ``slab`` command (for torchrun and environments without the script)."""
import sys

from pipeline.cli import main

sys.exit(main())
