"""``slab view``: a self-contained page opened in a real browser (headless Chromium from Debian's
package; ``.ci/run`` installs it), read back through the page's own JavaScript: every layer and
label name is there, and points given in world millimetres show the right value in every layer on
an oblique, flipped, anisotropic grid (NiiVue's own world-to-voxel mapping)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slab.pipeline.cli import main
from slab.pipeline.evaluation.viewer import _window, block_centres, build_page, label_map
from slab.core.errors import SlabError
from slab.io.volumes import load_volume

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's package)")
ANGLE = np.deg2rad(20)
AFFINE = np.array([[-0.9 * np.cos(ANGLE), -0.8 * np.sin(ANGLE), 0, 10.0],
                   [-0.9 * np.sin(ANGLE), 0.8 * np.cos(ANGLE), 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
SHAPE = (21, 17, 9)


def _case(root: Path) -> tuple[Path, Path, Path]:
    """Image, prediction (liver 1, spleen 2) and truth with known hits, false positives and misses."""
    rng = np.random.default_rng(0)
    pred, truth = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    pred[2:8, 3:9, 2:5], truth[4:10, 3:9, 2:5] = 1, 1
    pred[15:18, 10:14, 5:8], truth[15:18, 10:14, 5:8] = 2, 2
    paths = []
    for name, array in (("image", (rng.random(SHAPE) * 100).astype(np.float32)), ("pred", pred), ("truth", truth)):
        nib.save(nib.Nifti1Image(array, AFFINE), root / f"{name}.nii.gz")
        paths.append(root / f"{name}.nii.gz")
    return tuple(paths)


def _open(page: Path, fragment: str = "") -> dict:
    """The page in headless Chromium (WebGL2 through SwiftShader), after its scripts ran: #status.
    A page still loading when Chromium's virtual time ran out (a busy machine) is opened again
    with more time; an error the page reports fails at once."""
    for budget in (30000, 90000, 240000):
        done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                               "--enable-unsafe-swiftshader", "--window-size=800,600",
                               f"--virtual-time-budget={budget}", "--dump-dom", page.resolve().as_uri() + fragment],
                              capture_output=True, text=True, timeout=400)
        status = re.search(r'<pre id="status">([^<]*)</pre>', done.stdout)
        assert "<title>slab-view-error</title>" not in done.stdout, status and status.group(1)
        if "<title>slab-view-ready</title>" in done.stdout:
            return json.loads(status.group(1))
    raise AssertionError(f"the page never finished loading: {done.stderr[-2000:]}")


@needs_browser
def test_the_page_shows_every_layer_and_the_right_value_at_known_points(tmp_path):
    image_path, pred_path, truth_path = _case(tmp_path)
    voxels = {"hit": (5, 5, 3), "false positive": (2, 5, 3), "miss": (9, 5, 3), "spleen": (16, 12, 6),
              "background": (1, 2, 8)}
    probes = [list((AFFINE @ np.append(v, 1.0))[:3]) for v in voxels.values()]
    image, pred, truth = (load_volume(p) for p in (image_path, pred_path, truth_path))
    page, summary = build_page(image, pred, truth, names=["liver", "spleen"], probes=probes)
    (tmp_path / "case.html").write_text(page, encoding="utf-8")
    # opened as a cluster's link opens it (case.html#mm=x,y,z): the cursor at the cluster's centroid,
    # away from the volume's centre where a page opens otherwise
    centre = (AFFINE @ np.append((np.array(SHAPE) - 1) / 2, 1.0))[:3]
    far = max((c["mm"] for c in summary["clusters"]), key=lambda mm: np.linalg.norm(np.subtract(mm, centre)))
    assert np.linalg.norm(np.subtract(far, centre)) > 3
    status = _open(tmp_path / "case.html", "#mm=" + ",".join(f"{v:g}" for v in far))
    np.testing.assert_allclose(status["cursor"], far, atol=1e-3)
    assert status["layers"] == ["image", "prediction", "hit", "false_positive", "miss"]
    assert status["labels"][1] == ["background", "liver", "spleen"]
    assert status["labels"][2:] == [["background", "hit (true positive)"], ["background", "false positive"],
                                    ["background", "miss (false negative)"]]
    assert all(d == list(SHAPE) for d in status["dims"]) and summary["factor"] == 1
    shown = _window(np.asarray(image)[0])
    expected = {"hit": [1, 1, 0, 0], "false positive": [1, 0, 1, 0], "miss": [0, 0, 0, 1], "spleen": [2, 1, 0, 0],
                "background": [0, 0, 0, 0]}
    for (name, voxel), values in zip(voxels.items(), status["values"]):
        assert values == [int(shown[voxel])] + expected[name], name
    # scores and clusters beside the views: the spleen is all hit, the liver half
    assert [s["label"] for s in summary["scores"]] == ["liver", "spleen"] and summary["scores"][1]["dice"] == 1.0
    assert {c["kind"] for c in summary["clusters"]} == {"false_positive", "missed"}
    assert "onclick='jump(" in page and "NiiVue 0.69.0" in page


@needs_browser
def test_a_large_volume_is_shown_in_blocks_and_says_so(tmp_path):
    image_path, pred_path, _ = _case(tmp_path)
    assert main(["view", str(image_path), str(pred_path), "-o", str(tmp_path / "small.html"),
                 "--max-voxels", "500"]) == 0
    text = (tmp_path / "small.html").read_text(encoding="utf-8")
    assert "shown in blocks of 2³ voxels (the volume has 21×17×9)" in text
    status = _open(tmp_path / "small.html")
    assert status["layers"] == ["image", "prediction"] and status["dims"][0] == [11, 9, 5]


def test_label_maps_from_every_mask_layout():
    binary = np.zeros((1, 4, 4, 4), np.float32)
    binary[0, 1] = 1
    values, names = label_map(binary, None, "PRED")
    assert values.dtype == np.uint8 and int(values.max()) == 1 and names == ["label 1"]
    channels = np.zeros((2, 4, 4, 4), np.uint8)
    channels[0, 1], channels[1, 1:3] = 1, 1  # overlap: the later label wins
    values, names = label_map(channels, ["a", "b"], "PRED")
    assert values[1].max() == 2 and values[2].max() == 2 and names == ["a", "b"]
    with pytest.raises(SlabError, match="3 labels but 1 names"):
        label_map(np.full((1, 2, 2, 2), 3), ["one"], "PRED")
    with pytest.raises(SlabError, match="not 0/1 masks"):
        label_map(np.full((2, 2, 2, 2), 0.5), None, "PRED")


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    image_path, pred_path, _ = _case(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), tmp_path / "other.nii.gz")
    for argv, words in ((["view", str(image_path), "-o", str(tmp_path / "x.png")], ".html"),
                        (["view", str(image_path), str(tmp_path / "other.nii.gz"), "-o", str(tmp_path / "x.html")],
                         "other.nii.gz"),
                        (["view", str(image_path), str(pred_path), "-o", str(pred_path)], "is the input")):
        before = sorted(p.name for p in tmp_path.iterdir())
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_directory_of_cases_gives_an_index_worst_first(tmp_path, capsys):
    for folder in ("images", "preds", "truths"):
        (tmp_path / folder).mkdir()
    truth = np.zeros((12, 10, 8), np.uint8)
    truth[2:8, 2:8, 2:6] = 1
    for case, shift in (("good", 0), ("bad", 4), ("middle", 2)):
        pred = np.roll(truth, shift, axis=0)
        for folder, array in (("images", truth.astype(np.float32) * 50 + 10), ("preds", pred), ("truths", truth)):
            nib.save(nib.Nifti1Image(array, AFFINE), tmp_path / folder / f"{case}.nii.gz")
    assert main(["view", str(tmp_path / "images"), str(tmp_path / "preds"), str(tmp_path / "truths"),
                 "-o", str(tmp_path / "pages")]) == 0
    index = (tmp_path / "pages" / "index.html").read_text(encoding="utf-8")
    order = [index.index(f">{case}<") for case in ("bad", "middle", "good")]
    assert order == sorted(order)  # worst mean Dice first
    for case in ("good", "bad", "middle"):
        assert f"href='{case}.html'" in index and (tmp_path / "pages" / f"{case}.html").is_file()
    capsys.readouterr()
    assert main(["view", str(tmp_path / "images"), "-o", str(tmp_path / "one.html")]) == 2
    assert "directory of cases" in capsys.readouterr().err


def test_predict_writes_the_page_beside_its_mask(tmp_path, capsys):
    from slab.pipeline.paths import sample_dir

    image = Path(sample_dir("vessel_phantom")) / "image.nii.gz"
    assert main(["predict", "-i", str(image), "--bundle", "vessel_2p5d", "-o", str(tmp_path / "mask.nii.gz"),
                 "--axes", "xy", "--tta", "none", "--device", "cpu", "--view", str(tmp_path / "case.html")]) == 0
    page = (tmp_path / "case.html").read_text(encoding="utf-8")
    assert '"name": "prediction"' in page and '"labels": ["background", "label_1"]' in page  # the model's names
    capsys.readouterr()
    assert main(["predict", "-i", str(image.parent), "--bundle", "vessel_2p5d", "-o", str(tmp_path / "masks"),
                 "--view", str(tmp_path / "all.html")]) == 2
    assert "--view" in capsys.readouterr().err and not (tmp_path / "masks").exists()


def test_one_slice_and_prime_sized_volumes_make_pages(tmp_path):
    """A single slice (a 2D scan saved as a volume) and a prime-sized volume shown in blocks."""
    from monai.data import MetaTensor
    import torch

    for shape, max_voxels, factor in (((37, 29, 1), 10 ** 6, 1), ((31, 23, 13), 1000, 3)):
        rng = np.random.default_rng(1)
        image = MetaTensor(torch.from_numpy(rng.random((1, *shape)).astype(np.float32)), affine=torch.as_tensor(AFFINE))
        pred = (rng.random((1, *shape)) > 0.7).astype(np.uint8)
        truth = (rng.random((1, *shape)) > 0.7).astype(np.uint8)
        page, summary = build_page(image, pred, truth, max_voxels=max_voxels)
        assert summary["factor"] == factor and summary["layers"][-3:] == ["hit", "false_positive", "miss"]
        assert len(summary["clusters"]) == 10 and page.count('"kind": "labels"') == 4


def test_blocked_labels_sit_at_the_block_centres_the_page_places_them():
    values = np.arange(7 * 5 * 4, dtype=np.uint16).reshape(7, 5, 4)
    shown = block_centres(values, 3)
    assert shown.shape == (3, 2, 2)  # as many blocks as the averaged image has
    assert shown[0, 0, 0] == values[1, 1, 1] and shown[1, 1, 1] == values[4, 4, 3]  # centres (edge repeated)
    assert shown[2, 0, 0] == values[6, 1, 1]  # the last, partial block: its edge voxel
    assert block_centres(values, 1) is values


@pytest.mark.parametrize("command", ["evaluate", "errors"])
def test_evaluate_and_errors_write_the_page_of_what_they_scored(tmp_path, capsys, command):
    """``--view`` on slab evaluate and slab errors: the page of IMAGE, PRED (a probability map shown
    at the command's --threshold: one organ at 0.65 kept, the other at 0.55 dropped at 0.6), TRUTH
    and their hits / false positives / misses, the Dice of what was scored; without --image, one
    line and nothing written."""
    image_path, pred_path, truth_path = _case(tmp_path)
    pred = load_volume(pred_path).numpy()[0]
    probs = np.select([pred == 1, pred == 2], [0.65, 0.55], 0.2).astype(np.float32)
    nib.save(nib.Nifti1Image(probs, AFFINE), tmp_path / "probs.nii.gz")
    truth = (load_volume(truth_path).numpy()[0] > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(truth, AFFINE), tmp_path / "truth01.nii.gz")
    mask = probs > 0.6
    dice = 2 * (mask & (truth > 0)).sum() / (mask.sum() + truth.sum())
    extra = ["-o", str(tmp_path / "clusters.csv")] if command == "errors" else []
    argv = [command, str(tmp_path / "probs.nii.gz"), str(tmp_path / "truth01.nii.gz"), *extra, "--threshold", "0.6",
            "--image", str(image_path), "--view", str(tmp_path / "page.html")]
    assert main(argv) == 0
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert f"<td>label 1</td><td>{dice:.3f}</td>" in page and dice < 0.7  # the organ under 0.6 left out
    for layer in ('"name": "prediction"', '"name": "hit"', '"name": "false_positive"', '"name": "miss"'):
        assert layer in page, layer
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv[:-4] + ["--view", str(tmp_path / "again.html")]) == 2
    assert "--view: needs --image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _screenshot(page: Path, png: Path) -> np.ndarray:
    """The page as Chromium draws it (WebGL2 through SwiftShader), RGB."""
    from PIL import Image

    for budget in (30000, 90000):
        subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                        "--enable-unsafe-swiftshader", "--window-size=900,640", f"--virtual-time-budget={budget}",
                        "--hide-scrollbars", f"--screenshot={png}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=400)
        if png.is_file():
            return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    raise AssertionError("Chromium wrote no screenshot")


def _tinted(rgb: np.ndarray, colour) -> int:
    """Pixels whose colour leans the way ``colour`` does over a grey image (the layer at opacity
    0.6 over grey g is 0.6 * colour + 0.4 * g: the channel differences keep the colour's sign)."""
    r, g, b = (rgb[..., i] for i in range(3))
    cr, cg, cb = colour
    lean = np.ones(r.shape, bool)
    for x, y, cx, cy in ((r, g, cr, cg), (g, b, cg, cb), (r, b, cr, cb)):
        if abs(cx - cy) > 100:
            lean &= np.sign(x - y) == np.sign(cx - cy)
            lean &= np.abs(x - y) > 0.3 * abs(cx - cy)
    return int(lean.sum())


@needs_browser
def test_a_screenshot_shows_each_category_in_its_colour(tmp_path):
    """Chromium's screenshot: a page whose prediction is the truth (all hits) shows the hit colour
    (slab render's yellow) over the image; a page that predicted nothing (all misses) shows the
    miss colour (red) and no hit colour. The colours are read from the pixels, not assumed."""
    from slab.pipeline.evaluation.render import COLOURS

    image = np.full(SHAPE, 40.0, np.float32)
    image[3:18, 3:14, 1:8] = 60.0
    truth = np.zeros(SHAPE, np.uint8)
    truth[5:16, 4:13, 2:7] = 1
    counts = {}
    for case, pred in (("hits", truth), ("misses", np.zeros(SHAPE, np.uint8))):
        for name, array in (("image", image), ("pred", pred), ("truth", truth)):
            nib.save(nib.Nifti1Image(array, AFFINE), tmp_path / f"{case}_{name}.nii.gz")
        assert main(["view", str(tmp_path / f"{case}_image.nii.gz"), str(tmp_path / f"{case}_pred.nii.gz"),
                     str(tmp_path / f"{case}_truth.nii.gz"), "-o", str(tmp_path / f"{case}.html")]) == 0
        rgb = _screenshot(tmp_path / f"{case}.html", tmp_path / f"{case}.png")
        counts[case] = {k: _tinted(rgb, COLOURS[k]) for k in ("hit", "miss")}
    assert counts["hits"]["hit"] > 2000 and counts["misses"]["miss"] > 2000, counts
    # and nothing else on the page is drawn in their colours: not the crosshair, not the prediction's
    assert counts["misses"]["hit"] == 0 and counts["hits"]["miss"] == 0, counts


def test_an_empty_prediction_or_a_missed_label_is_shown_and_scored(tmp_path):
    """A prediction with nothing in it, or without a label the truth has: the truth's labels are
    scored (Dice 0 for what was missed), the misses drawn (this was a traceback)."""
    image_path, pred_path, truth_path = _case(tmp_path)
    image, pred, truth = (load_volume(p) for p in (image_path, pred_path, truth_path))
    _, empty = build_page(image, pred * 0, truth)
    assert [(s["label"], s["dice"]) for s in empty["scores"]] == [("label 1", 0.0), ("label 2", 0.0)]
    assert empty["layers"] == ["image", "prediction", "hit", "false_positive", "miss"]
    _, liver_only = build_page(image, (pred == 1).to(pred.dtype), truth, names=["liver", "spleen"])
    assert [s["label"] for s in liver_only["scores"]] == ["liver", "spleen"] and liver_only["scores"][1]["dice"] == 0.0
