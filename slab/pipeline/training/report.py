"""``report.html``: one self-contained page per run, rewritten after every epoch beside
``log.csv`` and ``tensorboard/`` (rank 0).

It holds what a reader of a run asks first: what was trained (task, network, data, the
configuration), how it went (the curves, one table row per epoch with the best one marked), and
what the best checkpoint predicts (sections of the first validation volumes, prediction and
truth outlined per label, redrawn at every new best into ``report/``). Pictures are embedded, so
the page can be mailed or attached to a ticket on its own.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

REPORT = "report.html"
PICTURES = "report"
_INDEX = "pictures.json"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1300px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f2f2; } tr.best td { background: #fff3c4; font-weight: bold; }
figure { margin: 0.8em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
"""
_SKIP = {"lr"}


def save_pictures(out: Path, drawn: list[tuple[str, Path]], epoch: int) -> None:
    """Record the pictures of the best epoch (``(caption, PNG)`` in ``out/report``)."""
    from slab.core.outputs import atomic_write

    index = [{"caption": caption, "file": Path(png).name} for caption, png in drawn]
    with atomic_write(out / PICTURES / _INDEX) as tmp:
        tmp.write_text(json.dumps({"epoch": epoch, "pictures": index}, indent=1) + "\n", encoding="utf-8")


def _pictures(out: Path) -> tuple[int | None, list[tuple[str, Path]]]:
    try:
        index = json.loads((out / PICTURES / _INDEX).read_text(encoding="utf-8"))
        return int(index["epoch"]), [(str(p["caption"]), out / PICTURES / Path(str(p["file"])).name)
                                     for p in index["pictures"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def _embedded(png: Path, alt: str) -> str:
    try:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
    except OSError:
        return f"<p>({html.escape(png.name)} missing)</p>"
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return html.escape(str(value))


def _table(history: list[dict], best_epoch) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns and k not in _SKIP]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for row in history:
        marked = ' class="best"' if row.get("epoch") == best_epoch else ""
        rows.append(f"<tr{marked}>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _summary(cfg: dict, history: list[dict], best: dict) -> str:
    network = cfg.get("network") or {}
    done = history[-1]["epoch"] if history else 0
    seconds = sum(float(r.get("epoch_s") or 0.0) for r in history)
    items = [("task", cfg.get("task")), ("network", network.get("name")),
             ("epochs", f"{done} of {cfg.get('epochs')}"), ("training time", f"{seconds:.0f} s"),
             ("batch size", cfg.get("batch_size")), ("learning rate", cfg.get("lr")), ("loss", cfg.get("loss"))]
    if cfg.get("task") != "classification":
        items += [("planes", ", ".join(cfg.get("planes") or [])) if cfg.get("task") == "segmentation_2p5d" else
                  ("patch size", cfg.get("patch_size"))]
    if best.get("epoch") is not None:
        row = next((r for r in history if r.get("epoch") == best["epoch"]), {})
        threshold = f", threshold {_cell(row.get('threshold'))}" if row.get("threshold") is not None else ""
        items.append(("best", f"{best['metric']} {_cell(best['value'])} at epoch {best['epoch']}{threshold}"))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in items
                               if v not in (None, "")) + "</table>"


def write_report(out: Path, cfg: dict, history: list[dict], best: dict) -> Path:
    """``out/report.html`` from the run's history, best checkpoint, ``curves.png`` and the
    best epoch's pictures; written atomically."""
    from slab.core.outputs import atomic_write

    out = Path(out)
    title = f"slab training run {out.resolve().name}"
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             _summary(cfg, history, best), "<h2>Curves</h2>", _embedded(out / "curves.png", "loss and validation curves"),
             "<h2>Epochs</h2>", _table(history, best.get("epoch"))]
    epoch, pictures = _pictures(out)
    if pictures:
        parts.append(f"<h2>Validation predictions at the best epoch ({epoch})</h2>"
                     "<p>Axial, coronal and sagittal sections through the truth's centre; prediction and truth "
                     "outlined.</p>")
        parts += [f"<figure>{_embedded(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                  for caption, png in pictures]
        pages = sorted((out / PICTURES).glob("val*.html"), key=lambda p: p.name)
        if pages:  # slab view's page of each kept validation volume, beside this report (NiiVue is 2 MB a page)
            parts.append("<p>In the viewer (slices, 3D, hits / false positives / misses as layers, error clusters): "
                         + ", ".join(f'<a href="{PICTURES}/{html.escape(p.name)}">{html.escape(p.stem)}</a>'
                                     for p in pages) + "</p>")
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(cfg, indent=2))}</pre>",
              "<p>Beside this page: <code>log.csv</code> (the table above), <code>curves.png</code>, "
              "<code>best.pt</code> / <code>last.pt</code>, and <code>tensorboard/</code> "
              "(<code>tensorboard --logdir tensorboard</code>).</p></body></html>\n"]
    with atomic_write(out / REPORT) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return out / REPORT
