"""What a run shows and leaves: one line per epoch on stdout, ``log.csv``, ``curves.png`` and
TensorBoard scalars (rank 0), and tqdm bars on a terminal."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any



class RunLog:
    """``log.csv``, ``curves.png`` and TensorBoard scalars, written by rank 0 after every epoch.

    TensorBoard's x axis is the optimizer step for every scalar (per-step training loss, per-epoch
    rows at their epoch's last step).
    """

    def __init__(self, out: Path, enabled: bool, first_step: int) -> None:
        self.out, self.enabled, self.writer = out, enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops what a crashed run logged past the checkpoint it resumes from
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step)

    def step(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def epoch(self, history: list[dict], step: int) -> None:
        if not self.enabled or not history:
            return
        from slab.core.outputs import atomic_write

        row = history[-1]
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(f"epoch/{key}", value, step)
            self.writer.flush()
        columns: list[str] = []
        for r in history:
            columns += [k for k in r if k not in columns]
        with atomic_write(self.out / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in history:
                writer.writerow({k: _csv_value(r.get(k)) for k in columns})
        plot_curves(history, self.out / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss curves (left) and validation metrics (right) against the epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from slab.core.outputs import atomic_write

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    skip = {"epoch", "lr", "images_per_s", "epoch_s", "threshold"}
    for key in [k for k in history[-1] if k not in skip]:
        points = [(e, r.get(key)) for e, r in zip(epochs, history) if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        ax = ax_loss if key.endswith("loss") else ax_metric
        ax.plot(*zip(*points), marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def epoch_line(row: dict, epochs: int) -> str:
    """One line per epoch: ``epoch 3/10  train_loss 0.4123  val_dice 0.8120  threshold 0.5  12.3 s``."""
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch", "lr", "images_per_s", "epoch_s") or key.startswith("val_auc_"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        elif isinstance(value, list):
            parts.append(f"{key} {','.join(f'{v:g}' for v in value)}")
    parts.append(f"{row['images_per_s']:.1f} img/s  {row['epoch_s']:.1f} s")
    return "  ".join(parts)


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True)

