"""Start-up: ``slab --help`` and ``slab COMMAND --help`` beside the interpreter alone and beside
importing what every command imported before (torch, MONAI, pyvista, SimpleITK).

    python benchmarks/bench_startup.py

Each command runs in a fresh process (best of 5 wall times).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402


def wall(argv: list[str], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    py = sys.executable
    interpreter = wall([py, "-c", "pass"])
    engines = wall([py, "-c", "import torch, monai, pyvista, SimpleITK"], repeats=3)
    rows = [("python -c pass (reference)", interpreter, 1.0),
            ("import torch, monai, pyvista, SimpleITK (what --help cost)", engines, engines / interpreter)]
    slab = [py, "-m", "slab.pipeline.cli"]
    for argv in (["--help"], ["predict", "--help"], ["train", "--help"], ["plan", "--help"], ["cv", "--help"],
                 ["evaluate", "--help"], ["render", "--help"], ["convert", "--help"]):
        t = wall(slab + argv)
        rows.append((f"slab {' '.join(argv)}", t, t / interpreter))
    print_table(["command", "wall s (best of 5)", "x interpreter"], "lrr",
                [(name, f"{t:.3f}", f"{r:.1f}") for name, t, r in rows])


if __name__ == "__main__":
    main()
