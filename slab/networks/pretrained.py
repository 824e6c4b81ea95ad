"""Pretrained 2D encoders for 2.5D networks (``flexible_unet``), loaded from local files only
unless downloads are allowed: the recipe of the competition write-ups (a slab of k slices into an
ImageNet encoder), with every tensor accounted for.

``"encoder_weights"`` in a network config is ``null``, ``"imagenet"`` or ``{"path": FILE,
"sha256": HEX}``. Resolution, in order:

1. a file given with its sha256: the hash checked, read with ``weights_only=True`` (or as
   safetensors);
2. ``"imagenet"``: the published file in ``$SLAB_HOME/encoders`` (default
   ``~/.cache/slab/encoders``), checked against the hash prefix its published name carries
   (torch.hub's convention);
3. where ``SLAB_ALLOW_DOWNLOADS=1``, the published file fetched by torch.hub from its pinned URL
   into that folder (written atomically, hash checked);
4. otherwise one line naming the file to place there and where it comes from
   (``python -m slab.networks.pretrained BACKBONE`` fetches it on a machine that is online).

The published formats are the encoders' own state dicts: lukemelas' EfficientNet-PyTorch files
(MONAI's ``efficientnet-b*`` URLs), torchvision's ResNet-50/101/152 (MONAI's share their key
names; MONAI's ResNet-18/34 have parameter-free shortcuts that no published file fits) and
Cadene's SE-ResNeXt-50/101 (MONAI's ``SE_NET_MODELS``; :mod:`slab.networks.encoders`). Every encoder tensor must be found with its shape, else the mismatches are listed; the
classifier head a published file carries (``_fc``, ``fc``, ``last_linear``) is the only thing left unused. For
k ≠ 3 input channels the first convolution is adapted as timm's ``adapt_input_conv`` does (the RGB
kernels summed for k = 1; repeated and scaled by 3/k otherwise), and the provenance says so.
Prediction never loads these files: a trained model carries its weights.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from slab.core.errors import SlabError

def _efficientnet_urls() -> dict:
    from monai.networks.nets.efficientnet import url_map

    return {name: url for name, url in url_map.items() if name.startswith("efficientnet-b")}


def _se_resnext_urls() -> dict:
    from monai.networks.nets.senet import SE_NET_MODELS

    from slab.networks.encoders import SE_RESNEXTS

    return {name: SE_NET_MODELS[name] for name in SE_RESNEXTS}


_IMAGENET_NOTE = ("ImageNet-trained weights: ImageNet's terms allow non-commercial research use; check the "
                  "licence before any other use")
# backbone -> (pinned URL of the published file, licence of the file)
# (the EfficientNet URLs are MONAI's own, ``monai.networks.nets.efficientnet.url_map``)
IMAGENET = {
    **{name: (url, "Apache-2.0 (EfficientNet-PyTorch); " + _IMAGENET_NOTE) for name, url in _efficientnet_urls().items()},
    # torchvision's ResNets fit MONAI's resnet50/101/152 key for key; MONAI's resnet18/34 have
    # parameter-free shortcuts where torchvision's have 1x1 convolutions, so no published file fits them
    **{name: (f"https://download.pytorch.org/models/{name}-{h}.pth", "BSD-3-Clause (torchvision); " + _IMAGENET_NOTE)
       for name, h in (("resnet50", "0676ba61"), ("resnet101", "63fe2227"), ("resnet152", "394f9c45"))},
    # Cadene's pretrainedmodels files (MONAI's own URLs, ``monai.networks.nets.senet.SE_NET_MODELS``)
    **{name: (url, "BSD-3-Clause (Cadene pretrained-models.pytorch); " + _IMAGENET_NOTE)
       for name, url in _se_resnext_urls().items()},
}
_HEADS = ("_fc.", "fc.", "last_linear.")  # the classifier of a published ImageNet file: not part of an encoder
_FIRST_CONV = ("_conv_stem.weight", "conv1.weight", "layer0.conv1.weight")
# own key -> published key: MONAI nests EfficientNet blocks by stage (_blocks.S.I.); MONAI's SENet
# names Cadene's convK / bnK / se_module.fcK / downsample.K by its own blocks (the inverse of
# ``monai.networks.nets.senet._load_state_dict``, with blocks numbered past 9 as in SE-ResNeXt-101)
_RENAMES = [(re.compile(pattern), published) for pattern, published in (
    (r"^_blocks\.\d+\.(\d+\..+)$", r"_blocks.\1"),
    (r"^(layer\d\.\d+\.)conv(\d)\.conv\.(\w+)$", r"\1conv\2.\3"),
    (r"^(layer\d\.\d+\.)conv(\d)\.adn\.N\.(\w+)$", r"\1bn\2.\3"),
    (r"^(layer\d\.\d+\.)se_layer\.fc\.0\.(\w+)$", r"\1se_module.fc1.\2"),
    (r"^(layer\d\.\d+\.)se_layer\.fc\.2\.(\w+)$", r"\1se_module.fc2.\2"),
    (r"^(layer\d\.\d+\.)project\.conv\.(\w+)$", r"\1downsample.0.\2"),
    (r"^(layer\d\.\d+\.)project\.adn\.N\.(\w+)$", r"\1downsample.1.\2"))]


def encoder_home() -> Path:
    """``$SLAB_HOME/encoders`` (default ``~/.cache/slab/encoders``)."""
    home = os.environ.get("SLAB_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "slab") / "encoders"


def check_spec(spec, backbone: str, spatial_dims: int) -> None:
    """A SlabError naming ``encoder_weights`` unless ``spec`` is null, ``"imagenet"`` (for a
    backbone with published 2D weights) or ``{"path", "sha256"}``."""
    if spec is None:
        return
    if int(spatial_dims) != 2:
        raise SlabError(f"encoder_weights: pretrained encoders are 2D (the 2.5D recipe); got spatial_dims {spatial_dims}")
    if spec == "imagenet":
        if backbone not in IMAGENET:
            raise SlabError(f"encoder_weights: no ImageNet weights are published for {backbone!r}; expected one of "
                            f"{', '.join(IMAGENET)}, or a file: {{\"path\": ..., \"sha256\": ...}}")
        return
    if isinstance(spec, dict) and set(spec) <= {"path", "sha256", "licence"} and isinstance(spec.get("path"), str) \
            and isinstance(spec.get("sha256"), str) and re.fullmatch(r"[0-9a-fA-F]{64}", spec["sha256"]):
        return
    raise SlabError(f"encoder_weights: expected null, \"imagenet\" or {{\"path\": FILE, \"sha256\": 64 hex digits}}, "
                    f"got {spec!r}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(backbone: str, folder: Path | None = None) -> Path:
    """The published ImageNet file of ``backbone`` downloaded by torch.hub from its pinned URL into
    ``folder`` (default :func:`encoder_home`), atomically, its hash prefix checked."""
    url, _ = IMAGENET[backbone]
    folder = Path(folder) if folder is not None else encoder_home()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / url.rsplit("/", 1)[1]
    if not target.is_file():
        partial = target.with_name(target.name + ".partial")
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=_hash_prefix(target.name), progress=False)
        partial.replace(target)
    return target


def _hash_prefix(name: str) -> str:
    return name.rsplit("-", 1)[1].split(".")[0]


def resolve(spec, backbone: str) -> tuple[Path, dict]:
    """``(file, provenance)`` of an ``encoder_weights`` spec (see the module's resolution order)."""
    if isinstance(spec, dict):
        path = Path(spec["path"]).expanduser()
        if not path.is_file():
            raise SlabError(f"encoder_weights: {path}: no such file")
        found = sha256_of(path)
        if found != spec["sha256"].lower():
            raise SlabError(f"encoder_weights: {path}: sha256 {found}, expected {spec['sha256'].lower()}; not the file "
                            "the config names")
        return path, {"source": str(path), "sha256": found, "licence": spec.get("licence", "as its source states")}
    url, licence = IMAGENET[backbone]
    name = url.rsplit("/", 1)[1]
    path = encoder_home() / name
    if not path.is_file():
        if os.environ.get("SLAB_ALLOW_DOWNLOADS") == "1":
            path = fetch(backbone)
        else:
            raise SlabError(f"encoder_weights imagenet: {name} is not in {encoder_home()}; place it there (from {url}; "
                            f"on a machine that is online: python -m slab.networks.pretrained {backbone} DIR) or set "
                            "SLAB_ALLOW_DOWNLOADS=1")
    found = sha256_of(path)
    if not found.startswith(_hash_prefix(name)):
        raise SlabError(f"encoder_weights imagenet: {path}: sha256 {found[:8]}..., the published file's starts "
                        f"{_hash_prefix(name)}; replace it with the file from {url}")
    return path, {"source": url, "sha256": found, "licence": licence}


def read_weights(path: Path) -> dict:
    """A state dict from a ``.pth``/``.pt`` file (``weights_only=True``) or a ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SlabError(f"encoder_weights: {path}: not a readable state dict ({type(err).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlabError(f"encoder_weights: {path}: expected a state dict of tensors")
    return state


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB first convolution's kernel ``(out, 3, ...)`` for ``channels`` inputs, as timm's
    ``adapt_input_conv``: summed over RGB for one channel, else repeated and scaled by 3/channels
    (the response to a constant input is kept exactly for 1 and multiples of 3 channels)."""
    if weight.shape[1] != 3:
        raise SlabError(f"encoder_weights: the first convolution has {weight.shape[1]} input channels, not RGB's 3")
    if channels == 3:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(channels / 3)
    return weight.repeat(1, repeat, *[1] * (weight.ndim - 2))[:, :channels] * (3 / channels)


def _published_key(key: str) -> str:
    for pattern, published in _RENAMES:
        if pattern.match(key):
            return pattern.sub(published, key)
    return key


def load_encoder(model: nn.Module, spec, backbone: str) -> dict:
    """Load ``spec``'s weights into ``model.encoder`` (a MONAI ``FlexibleUNet``'s, or a
    :class:`~slab.networks.sequence.SliceSequenceClassifier`'s, whose ResNet shortcuts carry a
    bias that torchvision's files do not: set to zero, their function exactly, and counted); the
    provenance (source, sha256, licence, what was adapted). Every encoder tensor is found with its
    shape, else one SlabError lists the mismatches; nothing is loaded partially."""
    path, provenance = resolve(spec, backbone)
    published = read_weights(path)
    own = model.encoder.state_dict()
    loaded, missing, mismatched, used = {}, [], [], set()
    for key, tensor in own.items():
        source = _published_key(key)
        if key.endswith("num_batches_tracked") and source not in published:
            loaded[key] = tensor  # older files do not carry the counter
            continue
        if source not in published:
            if key.endswith("downsample.0.bias") and source[:-4] + "weight" in published:
                loaded[key] = torch.zeros_like(tensor)  # torchvision's shortcuts have no bias: zero is theirs exactly
                provenance["zero_biases"] = provenance.get("zero_biases", 0) + 1
            elif not key.startswith(_HEADS):
                missing.append(source)
            else:
                loaded[key] = tensor
            continue
        value, used = published[source], used | {source}
        if source in _FIRST_CONV and value.shape != tensor.shape:
            value = adapt_input_conv(value, tensor.shape[1])
            provenance["adapted_input_conv"] = f"3 -> {tensor.shape[1]} channels (timm's adapt_input_conv)"
        if value.ndim == 4 and value.shape[2:] == (1, 1) and value.shape[:2] == tensor.shape and ".se_module." in source:
            value = value.reshape(tensor.shape)  # Cadene's squeeze-excitation 1x1 convolutions are MONAI's linears
        if value.shape != tensor.shape:
            mismatched.append(f"{source} {tuple(value.shape)} vs {tuple(tensor.shape)}")
            continue
        loaded[key] = value.to(tensor.dtype)
    unused = sorted(k for k in set(published) - used if not k.startswith(_HEADS))
    if missing or mismatched or unused:
        parts = [f"{len(missing)} encoder tensor(s) missing ({', '.join(missing[:3])}...)" if missing else "",
                 f"{len(mismatched)} of another shape ({', '.join(mismatched[:3])})" if mismatched else "",
                 f"{len(unused)} unknown to a {backbone} ({', '.join(unused[:3])})" if unused else ""]
        raise SlabError(f"encoder_weights: {path} does not fit {backbone}: " + "; ".join(p for p in parts if p))
    model.encoder.load_state_dict(loaded, strict=True)
    provenance["tensors"] = len(used)
    return provenance


def main(argv=None) -> int:
    """``python -m slab.networks.pretrained BACKBONE [DIR]``: fetch a published ImageNet file (online)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in IMAGENET:
        print(f"usage: python -m slab.networks.pretrained {{{','.join(IMAGENET)}}} [DIR]", file=sys.stderr)
        return 2
    print(fetch(args[0], Path(args[1]) if len(args) > 1 else None))
    return 0


__all__ = ["IMAGENET", "adapt_input_conv", "check_spec", "encoder_home", "fetch", "load_encoder", "resolve"]

if __name__ == "__main__":
    raise SystemExit(main())
