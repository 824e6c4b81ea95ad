"""What the benchmarks share: best-of timing, markdown tables, probes in a fresh interpreter.

Standard library only, so that a memory probe can import it without adding to what it measures.
Each ``benchmarks/bench_*.py`` runs as a script (``python benchmarks/bench_x.py``), which puts
this directory first on ``sys.path``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def best_time(repeats: int, fn: Callable):
    """``(seconds, value)``: the best time of ``repeats`` calls of ``fn`` and the last value."""
    times, value = [], None
    for _ in range(repeats):
        value = None  # free the previous output before timing the next call
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def best_of(repeats: int, ours: Callable, reference: Callable):
    """Alternate the two calls, reference first; ``(t_ours, t_reference, ours, reference)``:
    the best time of each and their last outputs."""
    times = {"ours": [], "reference": []}
    outputs = {}
    for _ in range(repeats):
        for name, fn in (("reference", reference), ("ours", ours)):
            outputs[name] = None  # free the previous output before timing the next call
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return min(times["ours"]), min(times["reference"]), outputs["ours"], outputs["reference"]


def print_table(header: Sequence[str], align: str, rows: Iterable[Sequence]) -> None:
    """A markdown table: ``align`` has one letter per column, ``l`` (left), ``r`` or ``c``."""
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(rule[a] for a in align) + " |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def proc_status(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ...) in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in keys}


def run_probe(code: str, *args) -> dict:
    """Run ``code`` in a fresh interpreter (the repository and this directory on its path) with
    ``args`` as ``sys.argv[1:]``; the JSON object it prints last. A failure ends the benchmark
    with the probe's error output."""
    preamble = f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]\n"
    result = subprocess.run([sys.executable, "-c", preamble + code, *map(str, args)], capture_output=True,
                            encoding="utf-8")
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])
