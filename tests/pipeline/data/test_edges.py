"""Edges: a slab at the first and last slices of every plane, and a slice smaller than the patch,
reach the network the same way in training (:class:`SlabDataset`) as in inference
(``iter_slab_batches`` + ``pad_to_divisor``, what ``predict_2p5d`` feeds): slice indices clamped
at the volume's ends, zeros split evenly around a slice (the extra voxel after), on normalised
values. The 3D crop pads as MONAI's sliding window pads a volume smaller than its ROI."""
import numpy as np
import pytest
import torch

from slab.pipeline.data.slabs import SlabDataset
from slab.transforms.slabs import PLANE_AXIS, iter_slab_batches, pad_to_divisor

SHAPE = (13, 11, 7)


def _volume():
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(1, *SHAPE) + 1  # no voxel is 0, the padding's value
    label = np.zeros((1, *SHAPE), np.uint8)
    label[0, 6, 5, 3] = 1
    return image, label


@pytest.mark.parametrize("plane", ["xy", "zx", "zy"])
@pytest.mark.parametrize("offsets", [(-1, 0, 1), (0, 2, 4), (-2, -1, 0, 1, 2)])
def test_a_slab_at_the_volume_ends_is_built_as_inference_builds_it(plane, offsets):
    image, label = _volume()
    dataset = SlabDataset([{"image": image, "label": label}], offsets=offsets, planes=[plane], samples_per_epoch=1,
                          patch_size=(16, 16), normalize=None)
    axis = PLANE_AXIS[plane]
    size = SHAPE[axis]
    for index in (0, 1, size - 2, size - 1):
        dataset.draw = lambda i, e, index=index: (0, plane, index, False, np.random.default_rng(0))
        trained = dataset.sample(0, 0)["image"]
        _, slabs = next(iter_slab_batches(image, plane, offsets, batch_size=1, start=index, stop=index + 1))
        inferred, pads = pad_to_divisor(torch.as_tensor(np.asarray(slabs)), 16)
        np.testing.assert_array_equal(trained, inferred[0].numpy())
        # the known answer: slice min(max(index + o, 0), size - 1) of the plane, zeros around it
        slices = [np.take(image[0], min(max(index + o, 0), size - 1), axis=axis) for o in offsets]
        h, w = slices[0].shape
        expected = np.pad(np.stack(slices), ((0, 0), ((16 - h) // 2, 16 - h - (16 - h) // 2),
                                             ((16 - w) // 2, 16 - w - (16 - w) // 2)))
        np.testing.assert_array_equal(trained, expected)
        assert pads == (((16 - h) // 2, 16 - h - (16 - h) // 2), ((16 - w) // 2, 16 - w - (16 - w) // 2))


def test_a_3d_patch_larger_than_the_volume_pads_as_the_sliding_window_does():
    """In memory (MONAI's ``SpatialPadd``, what the 3D task uses) and streamed
    (:class:`StreamedVolume`, slab's own), a 16^3 patch of a 13x11x7 volume is the zero-padded
    volume the sliding window hands the network at inference."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import SpatialPad

    from slab.pipeline.data.patches import StreamedVolume

    image, label = _volume()
    seen = []

    def network(x):
        seen.append(x.clone())
        return x

    sliding_window_inference(torch.as_tensor(image)[None], (16, 16, 16), 1, network, overlap=0.0)
    inferred = seen[0][0].numpy()
    np.testing.assert_array_equal(np.asarray(SpatialPad((16, 16, 16))(torch.as_tensor(image))), inferred)
    streamed = StreamedVolume(image, label, (16, 16, 16), None, None, "volume").crop((8, 8, 8))["image"]
    np.testing.assert_array_equal(streamed, inferred)
    # the known answer: (16 - 13) // 2 = 1, (16 - 11) // 2 = 2, (16 - 7) // 2 = 4 zeros before each axis
    assert inferred[0, 1, 2, 4] == image[0, 0, 0, 0] and inferred[0, 0].max() == 0 and inferred[0, :, :2].max() == 0
