"""Real MRI for the benchmarks, from nilearn's wheel (nothing downloaded): the MNI152 2009a T1
template and its grey / white matter probability maps at 2 mm, and *subjects* made from them.

One template is one brain: an intensity window separates its grey matter almost perfectly
(Dice 0.96), because the template is an average whose tissue classes were themselves drawn from
intensities. Real subjects differ in shape and in scanner: :func:`subject` deforms the template
smoothly (a random displacement field, images and labels moved together), multiplies it by a
smooth bias field of up to +-20 %, applies a gamma of 0.7-1.4 and adds noise, so that no single
fixed window fits every subject while the anatomy stays real.

    from mni import mni152, subject
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mni152(names=("gm", "wm")) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``(T1 0-255, [probability maps 0-1], affine)`` at 2 mm (each axis block-averaged by 2)."""
    import nibabel as nib
    from nilearn import datasets

    data = Path(datasets.__file__).parent / "data"

    def down(name):
        img = nib.load(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        a = np.asarray(img.dataobj, dtype=np.float32)
        s = [n // 2 * 2 for n in a.shape]
        a = a[:s[0], :s[1], :s[2]].reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))
        return a, img.affine

    t1, affine = down("t1")
    affine = np.array(affine, dtype=np.float64)
    affine[:3, :3] *= 2
    return t1, [down(n)[0] / 255.0 for n in names], affine


def _smooth_field(shape, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1]: normal values on a coarse ``grid``^3, cubic-upsampled."""
    from scipy import ndimage

    coarse = rng.normal(size=(grid, grid, grid))
    field = ndimage.zoom(coarse, [s / grid for s in shape], order=3, mode="nearest")[:shape[0], :shape[1], :shape[2]]
    return field / max(1e-6, np.abs(field).max())


def subject(t1: np.ndarray, maps: list[np.ndarray], seed: int, *, displacement_vox: float = 2.5,
            bias: float = 0.2, gamma=(0.7, 1.4), noise: float = 0.03) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """One synthetic subject of the template: ``(image 0-255 float32, [probability maps], how)``.

    A smooth displacement field of up to ``displacement_vox`` voxels per axis moves the image
    (linear) and the probability maps (linear; labels are thresholded after, so they move with
    the anatomy); a smooth multiplicative bias field of ``1 +- bias``, a gamma drawn from
    ``gamma`` (on intensities scaled to [0, 1]) and Gaussian noise of ``noise`` times the range.
    ``seed`` 0 with every amplitude 0 gives the template back.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = t1.shape
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [g + displacement_vox * _smooth_field(shape, rng) for g in grid]

    def warp(a):
        return ndimage.map_coordinates(a, coords, order=1, mode="nearest").astype(np.float32)

    image = warp(t1) / 255.0
    g = float(rng.uniform(*gamma))
    field = 1.0 + bias * _smooth_field(shape, rng, grid=3)
    image = np.clip(image, 0, None) ** g * field
    image = image + noise * rng.normal(size=shape)
    image = np.clip(image * 255.0, 0, None).astype(np.float32)
    return image, [np.clip(warp(m), 0, 1) for m in maps], {"gamma": g, "bias": [float(field.min()), float(field.max())]}


def write_subject(folder: Path, t1: np.ndarray, gm: np.ndarray, affine: np.ndarray, seed: int) -> dict:
    """Subject ``seed`` of the template written to ``folder`` (``image.nii.gz``, int16 T1, and
    ``label.nii.gz``, grey matter ``> 0.5``); its datalist item with absolute paths."""
    import nibabel as nib

    image, (grey,), _ = subject(t1, [gm], seed)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(image).astype(np.int16), affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image((grey > 0.5).astype(np.uint8), affine), folder / "label.nii.gz")
    return {"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz"), "case": folder.name}


__all__ = ["mni152", "subject", "write_subject"]
