"""Datalists, the 2.5D slab sampler and slab augmentation."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from slab.pipeline.data.slabs import SlabDataset
from slab.pipeline.data.datalist import load_datalist
from slab.pipeline.data.phantom import make_phantom, write_phantom
from slab.transforms.augment import RandSlabAugmentd
from slab.core.errors import SlabError
from slab.transforms.slabs import PLANE_AXIS, extract_slab


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom((20, 20, 20), seed=s) for s in range(2)]


def _items(phantoms):
    return [{"image": p.image, "label": p.label} for p in phantoms]


def test_load_datalist_resolves_checks_and_folds(tmp_path):
    for case in ("a", "b", "c"):
        write_phantom(tmp_path / case, shape=(8, 8, 8), seed=0)
    entry = lambda case, fold: {"image": f"{case}/image.nii.gz", "label": f"{case}/label.nii.gz", "fold": fold}  # noqa: E731
    data = {"training": [entry("a", 0), entry("b", 1)], "validation": [entry("c", 2)]}
    (tmp_path / "datalist.json").write_text(json.dumps(data), encoding="utf-8")
    train, val = load_datalist(tmp_path / "datalist.json", fold=None)
    assert [t["image"] for t in train] == [str(tmp_path / "a/image.nii.gz"), str(tmp_path / "b/image.nii.gz")]
    assert [v["label"] for v in val] == [str(tmp_path / "c/label.nii.gz")]
    train, val = load_datalist(tmp_path / "datalist.json")  # fold 0 by default
    assert [v["fold"] for v in val] == [0] and sorted(t["fold"] for t in train) == [1, 2]
    train, val = load_datalist(tmp_path / "datalist.json", fold=1)
    assert [v["fold"] for v in val] == [1] and sorted(t["fold"] for t in train) == [0, 2]
    with pytest.raises(SlabError, match="fold"):
        load_datalist(tmp_path / "datalist.json", fold=5)
    data["training"].append(entry("missing", 0))
    (tmp_path / "bad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SlabError, match="missing/image.nii.gz"):
        load_datalist(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(SlabError, match="broken.json"):
        load_datalist(tmp_path / "broken.json")


def test_samples_are_slabs_of_the_normalised_volume(phantoms):
    ds = SlabDataset(_items(phantoms), offsets=(-2, 0, 2), samples_per_epoch=12, normalize={"lower": 1, "upper": 99}, seed=5)
    for i in range(12):
        s = ds[i]
        assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.float32
        volume = ds.images[s["case"]]
        np.testing.assert_array_equal(s["image"].numpy(), extract_slab(volume, s["plane"], s["slice"], (-2, 0, 2)))
        label = phantoms[s["case"]].label.numpy()
        np.testing.assert_array_equal(s["label"].numpy(), extract_slab(label, s["plane"], s["slice"], (0,)))
    assert 0 <= ds.images[0].min() and ds.images[0].max() <= 1


def _crop_reference(ds, index, epoch):
    """The sample as slab-then-crop gives it: extract_slab of whole slices, then the window (the
    same rng draws in the same order), zero-padded where the patch is larger than the slice."""
    volume, plane, slice_index, positive, rng = ds.draw(index, epoch)
    image = extract_slab(ds.images[volume], plane, slice_index, ds.offsets).astype(np.float32)
    label = extract_slab(ds.labels[volume], plane, slice_index, (0,))
    centre = None
    if positive:
        pixels = np.argwhere(np.any(label > 0, axis=0))
        centre = pixels[int(rng.integers(len(pixels)))] if len(pixels) else None
    out_i, out_l = np.zeros((image.shape[0], *ds.patch_size), np.float32), np.zeros((label.shape[0], *ds.patch_size))
    source, target = [], []
    for axis in range(2):
        n, p = image.shape[axis + 1], ds.patch_size[axis]
        if p >= n:
            source.append(slice(0, n))
            target.append(slice((p - n) // 2, (p - n) // 2 + n))
            continue
        start = int(rng.integers(0, n - p + 1)) if centre is None else int(np.clip(centre[axis] - p // 2, 0, n - p))
        source.append(slice(start, start + p))
        target.append(slice(0, p))
    out_i[(slice(None), *target)] = image[(slice(None), *source)]
    out_l[(slice(None), *target)] = label[(slice(None), *source)]
    return out_i, out_l


@pytest.mark.parametrize("shape, patch, offsets", [((23, 1, 17), (8, 8), (-1, 0, 1)), ((5, 31, 12), (16, 7), (0, 2, 4)),
                                                   ((19, 13, 2), (13, 19), (-3, 0, 3))])
def test_crop_first_equals_slab_then_crop(shape, patch, offsets):
    rng = np.random.default_rng(1)
    image = rng.random((2, *shape)).astype(np.float32)  # two channels
    label = (rng.random((1, *shape)) > 0.9).astype(np.uint8)
    ds = SlabDataset([{"image": image, "label": label}], offsets=offsets, samples_per_epoch=40,
                     patch_size=patch, positive_fraction=0.6, seed=2, cache_dtype="float16")
    for index in range(40):
        sample = ds.sample(index, 3)
        expected_image, expected_label = _crop_reference(ds, index, 3)
        np.testing.assert_array_equal(sample["image"].numpy(), expected_image)
        np.testing.assert_array_equal(sample["label"].numpy(), expected_label)
        assert sample["image"].shape == (2 * len(offsets), *patch) and sample["image"].dtype == torch.float32
        assert not np.shares_memory(sample["label"].numpy(), ds.labels[0])


def test_positive_fraction_and_planes(phantoms):
    ds = SlabDataset(_items(phantoms), samples_per_epoch=600, positive_fraction=0.3, patch_size=(8, 8), seed=1)
    assert any(not f[p].all() for f in ds.slice_has_label for p in PLANE_AXIS)  # negatives exist
    draws = [ds.sample(i, 0) for i in range(600)]
    has_label = np.mean([bool(d["label"].any()) for d in draws])
    assert abs(has_label - 0.3) < 0.07
    assert {d["plane"] for d in draws} == set(PLANE_AXIS)
    assert all(d["image"].shape == (3, 8, 8) for d in draws)


def test_deterministic_per_epoch_and_index(phantoms):
    aug = RandSlabAugmentd(prob=0.5)
    make = lambda: SlabDataset(_items(phantoms), samples_per_epoch=8, augment=aug, patch_size=(12, 12), seed=3)  # noqa: E731
    a, b = make(), make()
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (5, 0, 3):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    b.set_epoch(3)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    batch = next(iter(DataLoader(a, batch_size=4)))
    assert batch["image"].shape == (4, 3, 12, 12) and batch["label"].shape == (4, 1, 12, 12)


def test_mismatched_image_and_label_named(tmp_path):
    write_phantom(tmp_path / "a", shape=(8, 8, 8), seed=0)
    write_phantom(tmp_path / "b", shape=(8, 8, 9), seed=0)
    write_phantom(tmp_path / "c", shape=(8, 8, 8), seed=0, spacing=(1, 1, 2))
    for other in ("b", "c"):
        with pytest.raises(SlabError, match=f"{other}/label.nii.gz"):
            SlabDataset([{"image": str(tmp_path / "a/image.nii.gz"), "label": str(tmp_path / other / "label.nii.gz")}])


def test_augment_geometry_identical_for_image_and_label():
    yy, xx = np.mgrid[:24, :24]
    blob = torch.from_numpy((((xx - 10) ** 2 + (yy - 13) ** 2) < 40).astype(np.float32))[None]
    for seed in range(6):
        # flips and 90° turns move pixels exactly: an image equal to its label stays equal
        out = RandSlabAugmentd(prob=1.0, affine=False, intensity=False).set_random_state(seed)(
            {"image": blob.repeat(3, 1, 1), "label": blob})
        assert all(torch.equal(out["image"][c], out["label"][0]) for c in range(3))
        # with the affine and elastic steps too, nearest resampling everywhere keeps them equal
        out = RandSlabAugmentd(prob=1.0, label_keys=("image", "label"), elastic=True, elastic_spacing=8).set_random_state(seed)(
            {"image": blob.clone(), "label": blob.clone()})
        assert torch.equal(out["image"], out["label"])
        # bilinear image, nearest label: they still agree away from the boundary
        out = RandSlabAugmentd(prob=1.0, intensity=False).set_random_state(seed)({"image": blob.clone(), "label": blob.clone()})
        assert ((out["image"] > 0.5) == (out["label"] > 0.5)).float().mean() > 0.97
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0}


def test_augment_identity_affine_and_seeding():
    # a zero-range affine resamples every pixel at its own centre: bilinear and nearest give the
    # input back exactly on a rectangle, so the grid's normalisation has no half-pixel error
    image, label = torch.rand(3, 7, 12), (torch.rand(1, 7, 12) > 0.5).to(torch.uint8)
    aug = RandSlabAugmentd(prob=1.0, flips=False, rot90=False, intensity=False, rotate_range=0, scale_range=0)
    out = aug.set_random_state(0)({"image": image, "label": label})
    torch.testing.assert_close(out["image"], image, atol=1e-6, rtol=0)
    assert torch.equal(out["label"], label)
    # a seed's draws do not depend on what was drawn before it (the RandomState is made lazily)
    aug = RandSlabAugmentd(prob=0.5, elastic=True)
    first = aug.set_random_state(7)({"image": image, "label": label})
    aug.set_random_state(8)({"image": image, "label": label})
    again = aug.set_random_state(7)({"image": image, "label": label})
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])


def test_randomizable_members_seed_as_monai_set_rnd():
    from monai.data.utils import set_rnd
    from monai.transforms import RandFlipd, RandGaussianNoised, Compose

    from slab.pipeline.training.engine import randomizable_members

    class Holder:
        def __init__(self):
            self.first = RandFlipd("x", prob=0.5)
            self.__hidden = RandFlipd("x", prob=0.5)
            self.items = [RandGaussianNoised("x"), 3, [RandFlipd("x")], "text"]
            self.pair = (RandFlipd("x"), Compose([RandFlipd("x")]))
            self.last = RandGaussianNoised("x")

    a, b = Holder(), Holder()
    set_rnd(a, 1234)
    members, _ = randomizable_members(b)
    for member, offset in members:
        member.set_random_state(seed=1234 + offset)
    found_a = [m for m, _ in randomizable_members(a)[0]]
    assert len(found_a) == 7
    for x, (y, _) in zip(found_a, members):
        assert x.R.randint(2**31) == y.R.randint(2**31)


def test_augment_rectangular_keeps_shape_and_dtype():
    aug = RandSlabAugmentd(prob=1.0).set_random_state(1)
    out = aug({"image": torch.rand(3, 8, 12), "label": torch.ones(2, 8, 12, dtype=torch.uint8)})
    assert out["image"].shape == (3, 8, 12) and out["label"].dtype == torch.uint8
    with pytest.raises(SlabError):
        RandSlabAugmentd(prob=2.0)
    with pytest.raises(SlabError):
        RandSlabAugmentd(label_keys=("mask",))


# ---------------------------------------------------------------------------------------------
# Slice sequences


def test_slab_centres_known_answers():
    from slab.pipeline.data.sequences import slab_centres

    assert slab_centres(0, 28, 5).tolist() == [0, 7, 14, 21, 28]
    assert slab_centres(10, 24, 3).tolist() == [10, 17, 24]
    assert slab_centres(3, 8, 1).tolist() == [6]  # round(5.5) = 6


def test_volume_sequences_crop_each_target_and_resize():
    import torch.nn.functional as F

    from slab.pipeline.data.sequences import volume_sequences

    rng = np.random.default_rng(1)
    image = rng.random((1, 16, 18, 20), dtype=np.float32)
    label = np.zeros((1, 16, 18, 20), np.uint8)
    label[0, 2:12, 3:15, 1:9] = 1  # x 2..11, y 3..14, z 1..8
    sequences = volume_sequences(image, label, targets=["C1", "C2"], n_slabs=3, offsets=(-1, 0, 1), plane="xy",
                                 size=(8, 10), crop_margin=0.1)
    assert [s["target"] for s in sequences] == ["C1"]  # C2 (value 2) is not in the label
    (seq,) = sequences
    assert seq["slices"].tolist() == [1, 4, 8] and seq["slabs"].dtype == torch.float16  # rint(1, 4.5, 8)
    # box grown by round(0.1 * 10) = 1 row and round(0.1 * 12) = 1 column per side
    for n, z in enumerate([1, 4, 8]):
        slab = np.stack([image[0, :, :, min(max(z + o, 0), 19)] for o in (-1, 0, 1)])[:, 1:13, 2:16]
        expected = F.interpolate(torch.from_numpy(slab)[None], size=(8, 10), mode="bilinear", align_corners=False)[0]
        assert torch.equal(seq["slabs"][n], expected.half())
    # zx plane: the sequence runs along y, over the target's y range 3..14
    (zx,) = volume_sequences(image, label, targets=["C1"], n_slabs=4, offsets=(0,), plane="zx", size=(8, 8))
    assert zx["slices"].tolist() == [3, 7, 10, 14] and tuple(zx["slabs"].shape) == (4, 1, 8, 8)
    (whole,) = volume_sequences(image, None, n_slabs=2, offsets=(0,), plane="xy", size=(8, 8))
    assert whole["target"] == "patient_overall" and whole["slices"].tolist() == [0, 19]


def test_study_sequences_targets():
    from slab.pipeline.data.sequences import study_sequences

    image = np.zeros((1, 8, 8, 10), np.float32)
    label = np.zeros((1, 8, 8, 10), np.uint8)
    label[0, 1:6, 1:6, :5], label[0, 1:6, 1:6, 5:] = 1, 2
    cfg = {"offsets": [-1, 0, 1], "classification": {"n_slabs": 2, "image_size": [8, 8], "plane": "xy",
                                                     "crop_margin": 0.1}}
    item = {"id": "s0", "image": "s0.nii.gz", "targets": {"C1": 1, "C2": 0, "patient_overall": 1}}
    rows = study_sequences(item, image, label, ["C1", "C2"], cfg)
    assert [(r["study"], r["target"], r["y"]) for r in rows] == [("s0", "C1", 1.0), ("s0", "C2", 0.0)]
    (row,) = study_sequences(item, image, None, ["C1", "C2"], cfg)
    assert (row["target"], row["y"]) == ("patient_overall", 1.0)
    (row,) = study_sequences({"image": "s1", "targets": {"C1": 0, "C2": 1}}, image, None, ["C1", "C2"], cfg)
    assert (row["study"], row["target"], row["y"]) == ("s1", "any", 1.0)
    with pytest.raises(SlabError, match="targets lack 'C2'"):
        study_sequences({"image": "s2", "targets": {"C1": 0}}, image, label, ["C1", "C2"], cfg)
    with pytest.raises(SlabError, match="without 'targets'"):
        study_sequences({"image": "s3"}, image, label, ["C1", "C2"], cfg)
