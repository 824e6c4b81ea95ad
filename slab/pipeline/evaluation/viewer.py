"""``slab view``: one self-contained HTML page to review a case in any browser (no server, from a
``file://`` URL or an e-mail attachment): the image, the prediction as a label map with its label
names, and with a truth the hits, false positives and misses as layers of their own (the colours
of ``slab render``), each toggled on and off; axial, coronal, sagittal and 3D views in the
patient's orientation (NiiVue labels them); scores per label and the largest error clusters,
each a link that moves the cursor to its centroid.

The viewer is NiiVue (BSD-2-Clause), carried in ``niivue/`` with its licence and the script that
updates it, inlined into the page. The volumes are inlined as gzipped NIfTI (base64); a volume of
more than ``max_voxels`` is shown in blocks of f³ voxels (the image averaged, labels taken at each
block's centre, categories by the majority of the block, as ``slab render`` draws them), and
the page says so. The page sets ``document.title`` to ``slab-view-ready`` when every layer has
loaded and writes what it shows (layers, label names, the values at a probe voxel) into
``#status`` as JSON, which the browser test reads back.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from slab.core.errors import SlabError
from slab.io.common import spacing_of

MAX_VOXELS = 160 ** 3  # shown at full resolution up to this many voxels (a 512³ case becomes ~8 MB)
# label colours of a prediction (RGB), cycled: none near the categories' yellow, green and red (slab
# render's), so that a prediction's colour is never read as a hit, a false positive or a miss
PALETTE = ((0, 130, 200), (145, 30, 180), (70, 240, 240), (240, 50, 230), (245, 130, 48), (0, 128, 128),
           (250, 190, 212), (170, 110, 40), (128, 128, 0), (0, 0, 128))


def _niivue() -> tuple[str, str]:
    folder = files("slab.pipeline.evaluation") / "niivue"
    return (folder / "niivue.umd.js").read_text(encoding="utf-8"), (folder / "VERSION").read_text().strip()


def _nifti_b64(array: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array), np.asarray(affine, np.float64))
    image.header.set_xyzt_units("mm")
    return base64.b64encode(gzip.compress(image.to_bytes(), compresslevel=6)).decode("ascii")


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    padded = np.pad(a, [(0, -s % f) for s in a.shape], mode="edge")
    x, y, z = (s // f for s in padded.shape)
    return padded.reshape(x, f, y, f, z, f).mean(axis=(1, 3, 5))


def block_centres(values: np.ndarray, f: int) -> np.ndarray:
    """A label map shown in blocks of ``f``³ voxels: each block's centre voxel (the edge repeated
    where the volume does not fill the last block), so labels sit where the averaged image and the
    page's affine (block centres) put them."""
    if f == 1:
        return values
    padded = np.pad(values, [(0, -s % f) for s in values.shape], mode="edge")
    o = (f - 1) // 2
    return np.ascontiguousarray(padded[o::f, o::f, o::f])


def _window(image: np.ndarray) -> np.ndarray:
    """The image as uint8 over its 0.5-99.5 percentile window (what the page needs to show)."""
    from slab.transforms.percentiles import volume_percentiles

    low, high = (float(v) for v in volume_percentiles(image, [0.5, 99.5], name="image"))
    scaled = (image.astype(np.float32) - low) / max(high - low, 1e-6)
    return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def label_map(volume: np.ndarray, names: list[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    """One label map (uint8/uint16) and its names from a mask volume ``(C, X, Y, Z)``: one binary
    channel; a label map of values 1..N; or one binary channel per label (a later label wins
    where channels overlap)."""
    a = np.asarray(volume)
    if a.ndim != 4:
        raise SlabError(f"{what}: expected a (C, X, Y, Z) mask, got shape {a.shape}")
    if a.shape[0] == 1:
        values = np.rint(a[0]).astype(np.int64)
        if values.min() < 0:
            raise SlabError(f"{what}: negative values; expected a mask or a label map")
        n = int(values.max())
    else:
        if not np.isin(a, (0, 1)).all():
            raise SlabError(f"{what}: {a.shape[0]} channels that are not 0/1 masks")
        values = np.zeros(a.shape[1:], np.int64)
        for c in range(a.shape[0]):
            values[a[c] > 0] = c + 1
        n = a.shape[0]
    names = list(names) if names else [f"label {i}" for i in range(1, n + 1)]
    if len(names) < n:
        raise SlabError(f"{what}: {n} labels but {len(names)} names")
    return values.astype(np.uint8 if n < 256 else np.uint16), names[:max(n, 1)]


def _colormap(names: list[str], colours) -> dict:
    return {"R": [0] + [c[0] for c in colours], "G": [0] + [c[1] for c in colours],
            "B": [0] + [c[2] for c in colours], "A": [0] + [255] * len(colours),
            "I": list(range(len(colours) + 1)), "labels": ["background", *names]}


def build_page(image, pred=None, truth=None, *, names=None, title: str = "case", max_voxels: int = MAX_VOXELS,
               top: int = 10, probes=None) -> tuple[str, dict]:
    """``(html, summary)`` of one case: ``image`` a MetaTensor ``(C, X, Y, Z)`` (channel 0 shown),
    ``pred`` / ``truth`` masks in its geometry (see :func:`label_map`). ``probes``: points in world
    millimetres (RAS) whose values the page reports in ``#status`` (default: the volume's centre)."""
    from slab.pipeline.evaluation.clusters import error_clusters
    from slab.pipeline.evaluation.metrics import evaluate
    from slab.pipeline.evaluation.render import CATEGORIES, COLOURS, LEGEND, category_map, display_factor

    raw = np.asarray(image)[0]
    affine = np.asarray(image.affine, np.float64)
    spacing = list(spacing_of(affine, image.meta.get("spacing") if hasattr(image, "meta") else None))
    f = display_factor(raw.shape, max_voxels)
    block = np.diag([f, f, f, 1.0])
    block[:3, 3] = (f - 1) / 2  # a display voxel is the centre of its block
    shown = affine @ block
    layers = [{"name": "image", "kind": "image", "b64": _nifti_b64(_window(_block_mean(raw, f)), shown)}]
    summary = {"factor": f, "shape": list(raw.shape), "layers": ["image"], "labels": [], "scores": None,
               "clusters": []}
    if pred is not None:
        given = names
        values, names = label_map(pred, given, "PRED")
        if truth is not None:  # a label the prediction missed entirely (or an empty prediction) is shown and scored
            truth_values, truth_names = label_map(truth, given, "TRUTH")
            names = truth_names if len(truth_names) > len(names) else names
        layers.append({"name": "prediction", "kind": "labels", "b64": _nifti_b64(block_centres(values, f), shown),
                       "colormap": _colormap(names, [PALETTE[i % len(PALETTE)] for i in range(len(names))])})
        summary["layers"].append("prediction")
        summary["labels"] = names
    if pred is not None and truth is not None:
        p_any, t_any = (values > 0)[None], (truth_values > 0)[None]
        categories, counts = category_map(p_any, t_any, f)
        for code, name in enumerate(CATEGORIES, 1):
            one = (categories == code).astype(np.uint8)
            layers.append({"name": name, "kind": "labels", "b64": _nifti_b64(one, shown),
                           "colormap": _colormap([LEGEND[name]], [COLOURS[name]])})
            summary["layers"].append(name)
        n = len(names)
        scores = evaluate(np.stack([values == i + 1 for i in range(n)]), np.stack([truth_values == i + 1 for i in range(n)]),
                          spacing, tolerances=(0.0,)) if n else {"classes": []}
        summary["scores"] = [{"label": names[i], "dice": c["dice"], "surface_dice_0": c["surface_dice"]["0.0"]}
                             for i, c in enumerate(scores["classes"])]
        summary["counts"] = counts
        clusters = error_clusters(values > 0, truth_values > 0, affine=affine, spacing=spacing)[:top]
        summary["clusters"] = [{"rank": c["rank"], "kind": c["kind"], "voxels": c["voxels"],
                                "mm": [round(float(c[f"world_{a}"]), 3) for a in "xyz"]} for c in clusters]
    centre = affine @ np.append((np.asarray(raw.shape) - 1) / 2, 1.0)
    summary["probes"] = [[float(v) for v in p] for p in probes] if probes else [[float(v) for v in centre[:3]]]
    return _html(layers, summary, title), summary


def _html(layers: list[dict], summary: dict, title: str) -> str:
    script, version = _niivue()
    rows = "".join(f"<tr><td>{html.escape(s['label'])}</td><td>{s['dice']:.3f}</td><td>{s['surface_dice_0']:.3f}</td></tr>"
                   for s in summary["scores"] or [])
    scores = f"<table><tr><th>label</th><th>Dice</th><th>SD@0</th></tr>{rows}</table>" if rows else ""
    links = "".join(f"<li><a href='#' onclick='jump({c['mm']});return false'>#{c['rank']} {c['kind'].replace('_', ' ')}"
                    f" ({c['voxels']:,} voxels)</a></li>" for c in summary["clusters"])
    clusters = f"<h3>largest errors</h3><ol>{links}</ol>" if links else ""
    toggles = "".join(f"<label><input type='checkbox' checked onchange='toggle({i}, this.checked)'> "
                      f"{html.escape(layer['name'].replace('_', ' '))}</label><br>" for i, layer in enumerate(layers))
    note = (f"shown in blocks of {summary['factor']}³ voxels (the volume has {'×'.join(map(str, summary['shape']))})"
            if summary["factor"] > 1 else f"full resolution, {'×'.join(map(str, summary['shape']))} voxels")
    data = {"layers": layers, "probes": summary["probes"]}
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slab view: {html.escape(title)}</title>
<style>body{{margin:0;display:flex;font:13px sans-serif;background:#111;color:#ddd;height:100vh}}
#side{{width:260px;padding:10px;overflow:auto}}#view{{flex:1;position:relative}}canvas{{width:100%;height:100%}}
a{{color:#8cf}}table{{border-collapse:collapse}}td,th{{padding:2px 6px;border-bottom:1px solid #333}}
#status{{display:none}}</style></head>
<body><div id="side"><h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><h3>layers</h3>{toggles}{scores}{clusters}
<p style="color:#888">slab view · NiiVue {html.escape(version)} (BSD-2-Clause)</p></div>
<div id="view"><canvas id="gl"></canvas></div><pre id="status"></pre>
<script>/* NiiVue {html.escape(version)}, BSD-2-Clause (see slab's slab/pipeline/evaluation/niivue/LICENSE) */
{script}</script>
<script>
const DATA = {json.dumps(data)};
let nv = null;
function toggle(i, on) {{ nv.setOpacity(i, on ? (i === 0 ? 1 : 0.6) : 0); }}
function jump(mm) {{ nv.scene.crosshairPos = nv.mm2frac(mm); nv.drawScene(); }}
async function start() {{
  nv = new niivue.Niivue({{isOrientationTextVisible: true, multiplanarForceRender: true, show3Dcrosshair: true,
                          backColor: [0, 0, 0, 1], loadingText: "loading", crosshairColor: [0.25, 0.5, 1, 1]}});
  await nv.attachTo("gl");
  for (const layer of DATA.layers) {{
    const bytes = Uint8Array.from(atob(layer.b64), c => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], {{type: "application/gzip"}}));
    const image = await niivue.NVImage.loadFromUrl({{url: url, name: layer.name + ".nii.gz",
                                                    opacity: layer.kind === "image" ? 1 : 0.6}});
    if (layer.colormap) image.setColormapLabel(layer.colormap);
    nv.addVolume(image);
  }}
  nv.setSliceType(nv.sliceTypeMultiplanar);
  // case.html#mm=x,y,z opens with the cursor at that world point (a link to a cluster from outside)
  const at = /^#mm=(-?[0-9.]+),(-?[0-9.]+),(-?[0-9.]+)$/.exec(location.hash);
  if (at) jump(at.slice(1, 4).map(Number));
  document.getElementById("status").textContent = JSON.stringify({{
    cursor: Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3),
    layers: nv.volumes.map(v => v.name.replace(".nii.gz", "")),
    labels: nv.volumes.map(v => v.colormapLabel && v.colormapLabel.labels ? v.colormapLabel.labels : null),
    probes: DATA.probes, values: DATA.probes.map(mm => nv.volumes.map(v => {{
      const x = Array.from(v.mm2vox(mm)).map(Math.round); return v.getValue(x[0], x[1], x[2]); }})),
    dims: nv.volumes.map(v => Array.from(v.hdr.dims.slice(1, 4)))}});
  document.title = "slab-view-ready";
}}
start().catch(e => {{ document.getElementById("status").textContent = "error: " + e; document.title = "slab-view-error"; }});
</script></body></html>
"""


def write_page(image_path, pred_path=None, truth_path=None, out_html="case.html", *, names=None,
               max_voxels: int = MAX_VOXELS, threshold: float = 0.5) -> dict:
    """Read the volumes (checked: same geometry), write the page atomically; its summary. A
    prediction that is a probability map (floating point) is shown as its mask ``> threshold``
    (the threshold ``slab evaluate`` and ``slab errors`` scored it at)."""
    from slab.core.outputs import atomic_write
    from slab.io.volumes import check_same_geometry, load_volume

    image = load_volume(image_path)
    volumes = [load_volume(p) if p is not None else None for p in (pred_path, truth_path)]
    if volumes[0] is not None and volumes[0].dtype.is_floating_point:
        volumes[0] = (volumes[0] > threshold).to(torch.uint8)
    given = [(v, str(p)) for v, p in zip(volumes, (pred_path, truth_path)) if v is not None]
    if given:
        check_same_geometry(image, *[v for v, _ in given], names=[str(image_path)] + [p for _, p in given])
    page, summary = build_page(image, *volumes, names=names, title=Path(str(image_path)).name, max_voxels=max_voxels)
    with atomic_write(Path(out_html)) as tmp:
        tmp.write_text(page, encoding="utf-8")
    summary["bytes"] = Path(out_html).stat().st_size
    return summary


def write_index(image_dir, pred_dir=None, truth_dir=None, out_dir="cases", *, names=None,
                max_voxels: int = MAX_VOXELS) -> list[dict]:
    """One page per case of a directory of volumes (cases as ``slab predict`` finds them; the
    prediction and truth of a case are the volumes of the same case name in their folders) and
    ``out_dir/index.html`` linking them, worst mean Dice first; the rows."""
    from slab.pipeline.data.cases import find_cases
    from slab.core.outputs import atomic_write

    def by_name(folder, what):
        if folder is None:
            return {}
        collection, found = find_cases(folder)
        if not collection:
            raise SlabError(f"{what} {folder}: expected a directory of volumes, as IMAGE is")
        return {case.name: case.source for case in found}

    collection, cases = find_cases(image_dir)
    if not collection:
        raise SlabError(f"{image_dir}: not a directory of volumes")
    preds, truths = by_name(pred_dir, "PRED"), by_name(truth_dir, "TRUTH")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        if pred_dir is not None and case.name not in preds:
            raise SlabError(f"PRED {pred_dir}: no prediction of case {case.name}")
        pred, truth = preds.get(case.name), truths.get(case.name) if pred_dir is not None else None
        summary = write_page(case.source, pred, truth, out / f"{case.name}.html", names=names, max_voxels=max_voxels)
        scores = summary["scores"]
        rows.append({"case": case.name, "page": f"{case.name}.html", "factor": summary["factor"],
                     "dice": float(np.mean([s["dice"] for s in scores])) if scores else None,
                     "errors": len(summary["clusters"])})
    rows.sort(key=lambda r: (r["dice"] is None, r["dice"] if r["dice"] is not None else 0.0, r["case"]))
    cells = [(r, "" if r["dice"] is None else f"{r['dice']:.3f}") for r in rows]
    body = "".join(f"<tr><td><a href='{html.escape(r['page'])}'>{html.escape(r['case'])}</a></td><td>{dice}</td>"
                   f"<td>{r['errors']}</td><td>{r['factor']}</td></tr>" for r, dice in cells)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>slab view: {len(rows)} cases</title></head>"
            "<body style='font:13px sans-serif'><h2>cases, worst mean Dice first</h2><table><tr><th>case</th>"
            f"<th>mean Dice</th><th>error clusters listed</th><th>block</th></tr>{body}</table></body></html>\n")
    with atomic_write(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return rows


__all__ = ["MAX_VOXELS", "block_centres", "build_page", "label_map", "write_index", "write_page"]
