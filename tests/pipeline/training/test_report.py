"""report.html of a training run: parsed back, its table equal to the run's history and best
checkpoint, its pictures decodable and equal to the sections of the best checkpoint's prediction."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from slab.pipeline.training import load_checkpoint, train
from test_train import _config, write_datalist


class _Page(HTMLParser):
    """Tables (rows of cells, with each row's class), images (data bytes) and headings."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.headings, self._cell, self._text = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append({"class": attrs.get("class"), "cells": []})
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.images.append((attrs.get("alt"), base64.b64decode(attrs["src"][len(prefix):])))
        elif tag in ("h1", "h2"):
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1]["cells"].append("".join(self._cell))
            self._cell = None
        elif tag in ("h1", "h2"):
            self.headings.append("".join(self._text))
            self._text = None

    def handle_data(self, data):
        for part in (self._cell, self._text):
            if part is not None:
                part.append(data)


def _page(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_datalist(tmp_path_factory.mktemp("report"), n=3)


def test_report_holds_the_run_and_the_best_checkpoints_pictures(cases, tmp_path):
    from slab.pipeline.evaluation.sections import cross_sections
    from slab.pipeline.inference import predict_2p5d
    from slab.pipeline.training.validation import load_pair
    from slab.networks import build_network, load_weights

    out = tmp_path / "run"
    result = train(cases, _config(epochs=2, report_volumes=1), out, device="cpu")
    page = _page(out / "report.html")
    assert page.headings[0] == "slab training run run"
    summary, epochs = page.tables[0], page.tables[1]
    facts = {row["cells"][0]: row["cells"][1] for row in summary}
    assert facts["task"] == "segmentation_2p5d" and facts["epochs"] == "2 of 2" and facts["network"] == "unet"
    best = load_checkpoint(out / "best.pt")
    assert facts["best"].startswith(f"surface_dice_0 {result['best']['value']:.4g} at epoch {result['best']['epoch']}")

    header, rows = epochs[0]["cells"], epochs[1:]
    assert header[:3] == ["epoch", "train_loss", "images_per_s"] and "val_dice" in header and "lr" not in header
    assert len(rows) == 2 == len(result["history"])
    for row, history in zip(rows, result["history"]):
        values = dict(zip(header, row["cells"]))
        assert values["epoch"] == str(history["epoch"])
        assert values["val_surface_dice_0"] == f"{history['val_surface_dice_0']:.4g}"
        assert (row["class"] == "best") == (history["epoch"] == result["best"]["epoch"])

    # curves.png, embedded as written
    assert page.images[0][1] == (out / "curves.png").read_bytes()
    # one picture: the first validation volume at the best epoch, equal to its sections redrawn
    # from best.pt's prediction at the chosen threshold
    index = json.loads((out / "report" / "pictures.json").read_text(encoding="utf-8"))
    assert index["epoch"] == best["epoch"] and len(index["pictures"]) == 2 and len(page.images) == 3
    picture = page.images[1][1]
    assert picture == (out / "report" / index["pictures"][0]["file"]).read_bytes()
    assert Image.open(io.BytesIO(picture)).size == (1200, 450)
    item = json.loads(cases.read_text(encoding="utf-8"))["validation"][0]
    image, label, spacing, affine = load_pair(item, best["config"]["normalize"])
    net = build_network(**best["network"])
    load_weights(net, out / "best.pt")
    torch.manual_seed(0)
    prob = predict_2p5d(net.eval(), image, planes=best["config"]["planes"], offsets=best["config"]["offsets"],
                        device="cpu", batch_size=best["config"]["val"]["batch_size"])
    threshold = best["threshold"]
    redrawn = cross_sections(image[0].numpy(), np.asarray(prob[0]).astype(np.float16) > threshold, label[0] > 0,
                             tmp_path / "redrawn.png", spacing=spacing,
                             title=f"{item['id']}: label 1, threshold {threshold:g}",
                             affine=affine)
    np.testing.assert_array_equal(np.asarray(Image.open(redrawn["path"])), np.asarray(Image.open(io.BytesIO(picture))))
    # the same volume in slab view's page, linked from the report: its Dice is best.pt's at the threshold
    mask, truth = np.asarray(prob[0]).astype(np.float16) > threshold, np.asarray(label[0]) > 0
    dice = 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())
    viewer = (out / "report" / "val0.html").read_text(encoding="utf-8")
    assert f"<td>label 1</td><td>{dice:.3f}</td>" in viewer and '"name": "miss"' in viewer
    assert '<a href="report/val0.html">val0</a>' in (out / "report.html").read_text(encoding="utf-8")
    # and the reliability curve over the body of the validation volumes, redrawn from best.pt's prediction
    from slab.pipeline.evaluation.calibration import calibration, plot_reliability, pooled

    curves = []
    for each in json.loads(cases.read_text(encoding="utf-8"))["validation"]:  # every validation volume
        image, label, _, _ = load_pair(each, best["config"]["normalize"])
        prob = predict_2p5d(net.eval(), image, planes=best["config"]["planes"], offsets=best["config"]["offsets"],
                            device="cpu", batch_size=best["config"]["val"]["batch_size"])
        curves.append(calibration(np.asarray(prob), (np.asarray(label) > 0).astype(np.uint8), np.asarray(image)))
    plot_reliability({"label 1": pooled([c[0] for c in curves])}, tmp_path / "reliability.png",
                     "reliability over the body, validation volumes")
    assert page.images[2][1] == (out / "report" / index["pictures"][1]["file"]).read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "reliability.png")),
                                  np.asarray(Image.open(io.BytesIO(page.images[2][1]))))
    assert not [p for p in out.rglob(".*")]


def test_report_without_pictures_and_after_a_resume(cases, tmp_path, monkeypatch):
    import slab.pipeline.training.engine as engine

    out = tmp_path / "run"
    train(cases, _config(epochs=1, report_volumes=0), out, device="cpu")
    page = _page(out / "report.html")
    assert len(page.images) == 1 and not any("predictions" in h for h in page.headings)
    assert not (out / "report").exists()

    # interrupted in its second epoch and resumed: the page is rewritten whole, the pictures of
    # the best epoch so far kept or redrawn
    real_start = engine.SlabTrainer.start_epoch

    def crash_in_second_epoch(self, run):
        if self.state.epoch == 2:
            raise KeyboardInterrupt
        return real_start(self, run)

    cfg = _config(epochs=2, report_volumes=1)
    monkeypatch.setattr(engine.SlabTrainer, "start_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cases, cfg, tmp_path / "resumed", device="cpu")
    assert len(_page(tmp_path / "resumed" / "report.html").tables[1]) == 1 + 1
    monkeypatch.setattr(engine.SlabTrainer, "start_epoch", real_start)
    result = train(cases, cfg, tmp_path / "resumed", device="cpu", resume=True)
    page = _page(tmp_path / "resumed" / "report.html")
    assert len(page.tables[1]) == 1 + 2  # the header and both epochs
    assert f"Validation predictions at the best epoch ({result['best']['epoch']})" in page.headings
    assert len(page.images) == 3  # curves, the first volume's sections, the reliability curve
