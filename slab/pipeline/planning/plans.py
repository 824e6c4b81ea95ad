"""Plans from a fingerprint: one training configuration per ``2d``, ``2p5d`` and ``3d``, every
decision with a one-line reason.

- **Slabs** (2d, 2p5d): where the slice spacing is at least ``ANISOTROPIC`` times the in-plane
  spacing (MRI, thick-slice CT) the network sees the acquisition plane only, and 2.5D looks
  forward with stride 2 (``[0, 2, 4]``, the UW-Madison recipe for 3 mm slices); near-isotropic
  volumes use all three planes with centred slabs ``[-1, 0, 1]``. ``2d`` is the same with one
  slice per slab.
- **Network**: a MONAI UNet whose depth follows the patch (the deepest feature map at least 4
  voxels wide, 2 to 5 levels, 16 base features doubling per level).
- **Pretrained encoder** (only where the user allows it, ``slab plan --encoder auto|BACKBONE``):
  the 2d and 2p5d configurations train an encoder UNet (``flexible_unet``) from the published
  ImageNet weights of a 2D encoder (``encoder_weights: "imagenet"``); ``auto`` picks
  EfficientNet-B0 on a CPU (the cheapest step of the published encoders: a CPU budget buys steps)
  and the SenNet write-up's SE-ResNeXt-50 on a GPU where its measured batch is at least
  ``ENCODER_MIN_BATCH`` (:func:`encoder_unet`). 3D keeps its UNet: the encoders are 2D.
- **Patch**: the median case's slices (2.5D) or volume (3D), capped per device and rounded to
  the network's divisor.
- **Batch size**: measured. One forward/backward at batch 1 and at batch 2 on the chosen device
  (CUDA: peak allocated memory; CPU: the bytes of every tensor autograd saves, plus the
  output), so memory per sample and the fixed part (weights, gradients, AdamW moments) come
  from a trial, and the batch is what fits the budget.
- **Normalisation**: a fixed window of the training cases' foreground 0.5/99.5 percentiles
  (computed by each run from its own training folds, ``"dataset": true``) for CT-like data
  (the datalist says CT, or intensities in Hounsfield range, or every case's foreground median
  within ``CONSISTENT`` of the dataset's range: a calibrated scale), a
  per-volume z-score for MRI-like data (scales differ from scan to scan), per-volume
  percentiles otherwise (one case: nothing to compare).
- **Schedule**: steps per epoch from the number of cases, epochs per device; augmentation
  stronger for small datasets. A training step at the chosen batch, a forward pass and the
  scoring of one validation case are timed (:mod:`slab.pipeline.planning.schedule`), so the plan
  says how long each configuration's schedule will take (``time``); a budget in minutes
  (``slab plan --budget``) scales the epochs (then the samples per epoch) of one training run
  to fit it.
- **Loss and outputs**: exclusive classes (a label map of values, or binary channels that never
  share a voxel) train a softmax with Dice + CE and predict by argmax; overlapping labels
  (regions) a sigmoid each with Dice + BCE (:func:`label_outputs`).
- **Prior**: a 2.5D configuration's loss undoes a lowered foreground prior too where the
  sampler's draws of slices without foreground are tissue, not air (:func:`prior_adjustment`).
- **Metric**: surface dice at tolerance 0 where a label is tubular (vessels: the SenNet metric),
  Dice otherwise; the plan's tolerance is one voxel of the coarsest axis.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from slab.core.errors import SlabError
from slab.pipeline.planning.schedule import expected_time, fit_budget, trial_scoring, trial_time


ANISOTROPIC = 2.0
CONSISTENT = 0.05
CONFIGURATIONS = ("2d", "2p5d", "3d")
PATCH_CAP_2D = {"cpu": 160, "cuda": 512}
VOXEL_CAP_3D = {"cpu": 64 ** 3, "cuda": 128 ** 3}
BATCH_CAP = {2: 32, 3: 4}
EPOCHS = {"cpu": 20, "cuda": 100}
ENCODER_MIN_BATCH = 8
DILUTED = 0.8  # a label's drawn share of the body below this much of the volumes': a lowered prior undone


def _axis_names(axis: int) -> str:
    return "xyz"[axis]


def normalization(fp: dict) -> tuple[dict, str]:
    """The normalisation settings for a fingerprint, and why."""
    modality = fp.get("modality")
    names = list(modality.values()) if isinstance(modality, dict) else [modality] if modality else []
    pooled = fp["intensity"]
    # the window itself is computed by each run from its own training cases (the held-out fold
    # never contributes); the fingerprint's pooled values are what it will be close to
    window = {"scheme": "percentile", "lower": 0.5, "upper": 99.5, "dataset": True}
    if names and all(str(n).upper() == "CT" for n in names):
        return window, "the datalist declares CT: a fixed window of the training cases' foreground 0.5-99.5 percentiles"
    if names and all(str(n).upper() in ("MRI", "MR", "T1", "T2", "FLAIR", "T1CE", "T1GD", "ADC", "DWI")
                     for n in names):
        return {"scheme": "zscore"}, "the datalist declares MRI: each volume's own mean and std (scales differ by scan)"
    cases = fp["cases"]
    if any(c["intensity"][0]["min"] <= -500 for c in cases) and fp["dtype"].startswith("int"):
        return window, ("signed intensities down to -500 and below (Hounsfield units): a fixed window of the "
                        "training cases' foreground 0.5-99.5 percentiles")
    if len(cases) < 2:
        return {"scheme": "percentile", "lower": 0.5, "upper": 99.5}, \
            "one case: each volume's own 0.5-99.5 percentiles (no other case to compare scales with)"
    spread = []
    for ch, whole in enumerate(pooled):
        width = max(whole["p99_5"] - whole["p0_5"], 1e-12)
        medians = [c["intensity"][ch]["p50"] for c in cases]
        spread.append((max(medians) - min(medians)) / width)
    worst = max(spread)
    if worst <= CONSISTENT:
        return window, (f"every case's foreground median lies within {worst:.1%} of the dataset's range "
                        "(a calibrated scale): a fixed window of the training cases' foreground 0.5-99.5 percentiles")
    return {"scheme": "zscore"}, (f"case foreground medians spread over {worst:.0%} of the dataset's range "
                                  "(MRI-like: scales differ by scan): each volume's own mean and std")


def label_outputs(fp: dict) -> tuple[str, str]:
    """``(loss, reason)``: exclusive classes train a softmax with Dice + CE (``dice_ce``) and
    predict by argmax; labels that overlap (regions, per-channel masks that share voxels) keep a
    sigmoid each (``dice_bce``). Decided from the labels themselves: a label map of values is
    exclusive by construction; binary channels are exclusive when no case has a voxel in two of
    them. One label: the two are the same sigmoid."""
    n = len(fp["labels"])
    if n == 1:
        return "dice_bce", "one label: Dice + BCE on its sigmoid (a softmax against the background is the same)"
    if fp.get("label_format") == "values":
        return "dice_ce", (f"{n} classes in one label map (exclusive by construction): a softmax with Dice + CE, "
                           "masks by argmax")
    shared = [c for c in fp["cases"] if c.get("overlap_voxels", 0)]
    if shared:
        voxels = sum(c["overlap_voxels"] for c in shared)
        return "dice_bce", (f"{n} label channels overlap ({voxels} voxels in two or more, in {len(shared)} of "
                            f"{len(fp['cases'])} cases: regions): a sigmoid per label with Dice + BCE")
    return "dice_ce", (f"{n} label channels never overlap (no voxel in two of them in {len(fp['cases'])} cases): "
                       "exclusive classes, a softmax with Dice + CE, masks by argmax")


def prior_adjustment(fp: dict, planes: list[str], positive_fraction: float) -> tuple[bool | str, str]:
    """``(logit_adjustment, reason)`` of a 2.5D configuration: ``"both"`` where the sampler's draws
    of slices without foreground add tissue (body voxels) and so lower a label's share of the body
    below ``DILUTED`` of the volumes' — a label shift the loss undoes (the vessel phantoms'
    vessel-free slices: 3.3 % of the drawn body against 5.8 %); else ``true``, only a raised prior
    undone: slices without foreground that are air (MNI152 grey matter: 59.2 % of the body drawn
    and whole) dilute nothing where the network has to decide (:mod:`slab.pipeline.training.prior`)."""
    from slab.pipeline.planning.fingerprint import drawn_body_shares
    from slab.transforms.slabs import PLANE_AXIS

    slices = fp.get("slices")
    if not slices or not fp["labels"]:
        return True, "no slice statistics in the fingerprint: only a raised prior undone"
    axes = sorted({PLANE_AXIS[p] for p in planes})
    if not any(slices["negative"][a] for a in axes):
        return True, "every slice holds foreground: the draws are slices prediction meets; only a raised prior undone"
    shares = drawn_body_shares(slices, positive_fraction, axes)
    parts = "; ".join(f"{lab['name']} {d:.1%} drawn, {w:.1%} in the volumes"
                      for lab, (d, w) in zip(fp["labels"], shares) if w == w and d == d) or "no body"
    if any(w > 0 and d < DILUTED * w for d, w in shares):
        return "both", (f"the slices without foreground hold tissue, so drawing them lowers a label's share of the "
                        f"body ({parts}): a label shift, the loss undoes the lowered prior too")
    return True, (f"the draws keep each label's share of the body ({parts}): the slices without foreground add "
                  "air, not a label shift; only a raised prior undone")


def slab_geometry(fp: dict, k: int) -> tuple[list[str], list[int], str]:
    """``(planes, offsets, reason)`` of ``k`` slices per slab (``k`` 1 or 3)."""
    spacing = fp["median_spacing"]
    coarse = int(np.argmax(spacing))
    fine = [s for a, s in enumerate(spacing) if a != coarse]
    ratio = spacing[coarse] / max(min(fine), 1e-12)
    plane = {0: "zy", 1: "zx", 2: "xy"}[coarse]
    if ratio >= ANISOTROPIC:
        offsets = [0] if k == 1 else [0, 2, 4]
        return [plane], offsets, (f"slices {spacing[coarse]:g} mm apart along {_axis_names(coarse)} vs "
                                  f"{min(fine):g} mm in plane ({ratio:.1f}x, >= {ANISOTROPIC:g}x): the acquisition "
                                  f"plane {plane} only" + ("" if k == 1 else ", slabs forward with stride 2"))
    offsets = [0] if k == 1 else [-1, 0, 1]
    return ["xy", "zx", "zy"], offsets, (f"near-isotropic spacing ({ratio:.1f}x < {ANISOTROPIC:g}x): all three "
                                         "planes" + ("" if k == 1 else ", slabs centred [-1, 0, 1]"))


def unet(patch: list[int]) -> tuple[dict, int, str]:
    """A UNet for ``patch``: ``(network settings, divisor, reason)``."""
    downs = int(np.clip(math.floor(math.log2(max(min(patch), 1) / 4)), 1, 4))
    channels = [16 * 2 ** i for i in range(downs + 1)]
    net = {"name": "unet", "channels": channels, "strides": [2] * downs, "num_res_units": 1}
    return net, 2 ** downs, (f"UNet of {downs + 1} levels ({'-'.join(map(str, channels))} features): the deepest "
                             f"map of the {min(patch)}-voxel side is {min(patch) // 2 ** downs} wide")


def check_encoder(encoder) -> None:
    """A SlabError naming ``--encoder`` unless it is None, ``"auto"`` or a backbone with published
    ImageNet weights."""
    from slab.networks.pretrained import IMAGENET

    if encoder is not None and encoder != "auto" and encoder not in IMAGENET:
        raise SlabError(f"--encoder: expected auto or one of {', '.join(IMAGENET)}, got {encoder!r}")


def encoder_unet(encoder: str, patch, device: torch.device, budget: int, in_channels: int,
                 out_channels: int) -> tuple[dict, int, str]:
    """An encoder UNet from published ImageNet weights (``encoder`` is ``"auto"`` or a backbone of
    ``slab.networks.pretrained.IMAGENET``): ``(network settings, divisor, reason)``."""
    from slab.networks import network_divisor
    from slab.networks.pretrained import IMAGENET, encoder_home

    check_encoder(encoder)
    divisor = network_divisor("flexible_unet", 2)
    backbone, why = encoder, "the one asked (--encoder)"
    if encoder == "auto":
        backbone, why = "efficientnet-b0", "a CPU budget buys steps: the cheapest step of the published encoders"
        if device.type == "cuda":
            net = {"name": "flexible_unet", "backbone": "se_resnext50_32x4d"}
            memory = trial_memory(net, 2, in_channels, out_channels, _round_patch(patch, divisor), device)
            batch = _batch(memory, budget, 2)[0]
            if batch >= ENCODER_MIN_BATCH:
                backbone, why = "se_resnext50_32x4d", f"the SenNet write-up's encoder; batch {batch} fits the GPU"
            else:
                why = f"SE-ResNeXt-50 fits batch {batch} < {ENCODER_MIN_BATCH}: the cheapest of the published encoders"
    url = IMAGENET[backbone][0]
    name = url.rsplit("/", 1)[1]
    where = (f"{name} is in {encoder_home()}" if (encoder_home() / name).is_file()
             else f"before training, place {name} in {encoder_home()} (from {url}) or set SLAB_ALLOW_DOWNLOADS=1")
    return ({"name": "flexible_unet", "backbone": backbone, "encoder_weights": "imagenet"}, divisor,
            f"encoder UNet from {backbone}'s ImageNet weights ({why}; pretrained encoders allowed by --encoder); "
            f"{where}")


def network_summary(net: dict) -> str:
    """``UNet [16, 32, 64]`` or ``encoder UNet efficientnet-b0 (imagenet)``."""
    if net["name"] == "flexible_unet":
        return f"encoder UNet {net['backbone']}" + (f" ({net['encoder_weights']})" if net.get("encoder_weights") else "")
    return f"UNet {net.get('channels')}" if net["name"] == "unet" else net["name"]


def _round_patch(patch, divisor: int) -> list[int]:
    return [max(2 * divisor, (int(p) // divisor) * divisor) for p in patch]


def patch_2d(fp: dict, planes: list[str], device: str) -> tuple[list[int], str]:
    shape = fp["median_shape"]
    axes = {"xy": (0, 1), "zx": (0, 2), "zy": (1, 2)}  # the slab's (A, B) axes
    first = sorted(shape[axes[p][0]] for p in planes)[len(planes) // 2]
    second = sorted(shape[axes[p][1]] for p in planes)[len(planes) // 2]
    cap = PATCH_CAP_2D[device]
    return [min(cap, first), min(cap, second)], f"the median case's slices ({first}x{second}), capped at {cap} on {device}"


def patch_3d(fp: dict, device: str) -> tuple[list[int], str]:
    patch = [float(s) for s in fp["median_shape"]]
    spacing = fp["median_spacing"]
    cap = VOXEL_CAP_3D[device]
    while np.prod(patch) > cap:
        extent = [p * s for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extent))
        patch[axis] = max(8.0, patch[axis] * 0.9)
    return [int(p) for p in patch], (f"the median case ({'x'.join(map(str, fp['median_shape']))}), the longest "
                                     f"physical axis shrunk until the patch holds at most {cap} voxels on {device}")


def trial_memory(network: dict, dims: int, in_channels: int, out_channels: int, patch, device: torch.device) -> dict:
    """Memory of one training step, measured at batch 1 and 2: ``per_sample`` and ``fixed`` bytes."""
    from slab.networks import build_network

    options = {k: v for k, v in network.items() if k != "name"}
    model = build_network(network["name"], dims, in_channels, out_channels, **options).to(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    used = []
    for batch in (1, 2):
        model.zero_grad(set_to_none=True)
        x = torch.randn(batch, in_channels, *patch, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model(x).float().mean().backward()
            torch.cuda.synchronize(device)
            used.append(torch.cuda.max_memory_allocated(device) - base)
        else:
            saved = [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = model(x)
            y.float().mean().backward()
            used.append(saved[0] + 2 * y.numel() * y.element_size() + x.numel() * x.element_size())
    per_sample = max(1, used[1] - used[0])
    fixed = max(0, used[0] - per_sample) + 4 * params  # weights, gradients, two AdamW moments
    del model
    return {"per_sample": int(per_sample), "fixed": int(fixed), "parameters": int(params // 4)}


def _batch(memory: dict, budget: int, dims: int) -> tuple[int, str]:
    fits = (budget - memory["fixed"]) // memory["per_sample"]
    batch = int(np.clip(fits, 2, BATCH_CAP[dims]))
    return batch, (f"{memory['per_sample'] / 2**20:.0f} MiB per sample and {memory['fixed'] / 2**20:.0f} MiB fixed "
                   f"(measured by a trial forward/backward): {fits} fit {budget / 2**30:.1f} GiB, "
                   f"clipped to [2, {BATCH_CAP[dims]}]")


def _schedule(fp: dict, batch: int, device: str, epochs: int | None) -> tuple[dict, str]:
    n = fp["n_cases"]
    steps = int(np.clip(10 * n, 20, 250))
    chosen = epochs or EPOCHS[device]
    return ({"epochs": chosen, "samples_per_epoch": steps * batch, "warmup_epochs": min(1.0, chosen / 10)},
            f"{steps} steps per epoch for {n} cases (10 per case, 20 to 250), {chosen} epochs on {device}"
            + (" (--epochs)" if epochs else ""))


def _augment(fp: dict, dims: int) -> tuple[dict, str]:
    n = fp["n_cases"]
    prob = 0.7 if n < 10 else 0.5 if n < 50 else 0.3
    aug = {"prob": prob} if dims == 2 else {"flip_prob": prob, "rot90_prob": prob, "intensity_prob": prob}
    return aug, f"{n} cases: augmentation probability {prob} (stronger for smaller datasets)"


def default_budget(device: torch.device) -> int:
    """Bytes a plan may use: 80% of the GPU, or a quarter of the available memory (at most 8 GiB)."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    from slab.io.headers import available_memory

    available = available_memory() or 8 << 30
    return int(min(available // 4, 8 << 30))


def plan_configuration(fp: dict, name: str, device: torch.device, budget: int, epochs: int | None = None,
                       minutes: float | None = None, n_folds: int = 5, encoder: str | None = None) -> dict:
    """The plan of one configuration: ``{"config": training config, "reasons": {...}, "memory":
    {...}, "time": {...}}``; ``minutes`` scales its schedule to one training run of that long
    (:func:`~slab.pipeline.planning.schedule.fit_budget`); ``encoder`` (``"auto"`` or a backbone) allows a pretrained 2D encoder
    (:func:`encoder_unet`)."""
    kind = device.type
    reasons: dict[str, str] = {}
    cfg: dict = {}
    channels = fp["channels"]
    labels = len(fp["labels"])
    if name in ("2d", "2p5d"):
        k = 1 if name == "2d" else 3
        planes, offsets, reasons["planes"] = slab_geometry(fp, k)
        reasons["offsets"] = reasons["planes"]
        patch, reasons["patch_size"] = patch_2d(fp, planes, kind)
        dims, in_channels = 2, channels * k
        net, divisor, reasons["network"] = encoder_unet(encoder, patch, device, budget, in_channels, labels) \
            if encoder else unet(patch)
        patch = _round_patch(patch, divisor)
        cfg.update(task="segmentation_2p5d", offsets=offsets, planes=planes, patch_size=patch)
    elif name == "3d":
        patch, reasons["patch_size"] = patch_3d(fp, kind)
        net, divisor, reasons["network"] = unet(patch)
        if encoder:
            reasons["network"] += " (pretrained encoders are 2D: --encoder applies to 2d and 2p5d)"
        patch = _round_patch(patch, divisor)
        cfg.update(task="segmentation_3d", patch_size=patch)
        dims, in_channels = 3, channels
        spacing = fp["median_spacing"]
        reasons["target_spacing"] = (f"the median spacing {spacing}; cases are used at their own spacing"
                                     + ("" if fp["spacings_agree"] else " (they differ by more than 5%: resample "
                                        "them to one spacing first, e.g. slab convert)"))
    else:
        raise SlabError(f"configuration: expected one of {', '.join(CONFIGURATIONS)}, got {name!r}")
    cfg["network"] = net
    memory = trial_memory(net, dims, in_channels, labels, patch, device)
    cfg["batch_size"], reasons["batch_size"] = _batch(memory, budget, dims)
    schedule, reasons["epochs"] = _schedule(fp, cfg["batch_size"], kind, epochs)
    cfg.update(schedule)
    reasons["samples_per_epoch"] = reasons["epochs"]
    cfg["normalize"], reasons["normalize"] = normalization(fp)
    cfg["loss"], reasons["loss"] = label_outputs(fp)
    cfg["augment"], reasons["augment"] = _augment(fp, dims)
    tubular = [lab["name"] for lab in fp["labels"] if lab["tubular"]]
    tolerance = float(max(fp["median_spacing"]))
    metric = "surface_dice_0" if tubular else "dice"
    reasons["val.metric"] = (f"tubular label(s) {', '.join(tubular)}: surface dice at tolerance 0" if tubular
                             else "no tubular label: Dice")
    reasons["val.tolerance_mm"] = f"one voxel of the coarsest axis ({tolerance:g} mm)"
    cfg["val"] = {"metric": metric, "tolerance_mm": tolerance, "tta": "none"}
    if dims == 3:
        cfg["val"]["overlap"] = 0.25
    from slab.pipeline.training.config import validate_config

    filled = validate_config(cfg)  # a plan is a valid training configuration
    if dims == 2:
        cfg["logit_adjustment"], reasons["logit_adjustment"] = prior_adjustment(fp, cfg["planes"],
                                                                                filled["positive_fraction"])
    timing = trial_time(net, dims, in_channels, labels, patch, cfg["batch_size"], device)
    timing["score_s_per_case"] = trial_scoring(fp, filled)
    if minutes is not None:
        reasons["epochs"] = fit_budget(fp, cfg, timing, n_folds, minutes)
        reasons["samples_per_epoch"] = reasons["epochs"]
    expected = expected_time(fp, cfg, timing, n_folds)
    return {"config": cfg, "reasons": reasons,
            "time": {**expected, "step_s": round(timing["step_s"], 4),
                     "forward_ms_per_sample": round(1000 * timing["forward_s_per_sample"], 3),
                     "score_s_per_case": round(timing["score_s_per_case"], 3), "device": kind},
            "memory": {"per_sample_mib": round(memory["per_sample"] / 2**20, 2),
                       "fixed_mib": round(memory["fixed"] / 2**20, 2), "budget_gib": round(budget / 2**30, 2),
                       "parameters": memory["parameters"], "device": kind}}


def make_plans(fp: dict, *, device=None, memory_gib: float | None = None, epochs: int | None = None,
               configurations=CONFIGURATIONS, minutes: float | None = None, n_folds: int = 5,
               encoder: str | None = None) -> dict:
    """Plans of every configuration for a fingerprint (``slab.pipeline.planning.fingerprint``);
    ``minutes``: each configuration's schedule scaled to one training run of that long;
    ``encoder``: a pretrained 2D encoder allowed (:func:`encoder_unet`)."""
    from slab.core.device import resolve_device

    device = resolve_device(device)
    budget = int(memory_gib * (1 << 30)) if memory_gib else default_budget(device)
    out = {"device": device.type, "memory_gib": round(budget / 2**30, 2), "configurations": {}}
    if minutes is not None:
        out["budget_minutes"] = minutes
    if encoder:
        out["encoder"] = encoder
    for name in configurations:
        out["configurations"][name] = plan_configuration(fp, name, device, budget, epochs, minutes, n_folds, encoder)
    first = out["configurations"][configurations[0]]["config"]["val"]
    out["target_metric"] = first["metric"]
    out["tolerance_mm"] = first["tolerance_mm"]
    out["labels"] = [lab["name"] for lab in fp["labels"]]
    out["tubular"] = [lab["name"] for lab in fp["labels"] if lab["tubular"]]
    return out


def describe(fp: dict, plans: dict) -> str:
    """The human-readable summary ``slab plan`` prints."""
    lines = [f"{fp['n_cases']} cases, {fp['channels']} channel(s), median shape "
             f"{'x'.join(map(str, fp['median_shape']))}, spacing {'x'.join(f'{s:g}' for s in fp['median_spacing'])} mm "
             f"(anisotropy {fp['anisotropy']:.2f})"]
    for lab in fp["labels"]:
        lines.append(f"  label {lab['name']}: {lab['mean_fraction']:.2%} of voxels, ~{lab['median_components']:g} "
                     f"component(s), radius ~{lab['median_radius_vox']:.1f} voxels"
                     + (" (tubular)" if lab["tubular"] else ""))
    lines.append(f"target metric {plans['target_metric']}, tolerance {plans['tolerance_mm']:g} mm, "
                 f"memory budget {plans['memory_gib']} GiB on {plans['device']}")
    for name, plan in plans["configurations"].items():
        cfg = plan["config"]
        slab = f" planes {','.join(cfg['planes'])} offsets {cfg['offsets']}" if "offsets" in cfg else ""
        lines.append(f"{name}: {cfg['task']}{slab} patch {'x'.join(map(str, cfg['patch_size']))} "
                     f"{network_summary(cfg['network'])} batch {cfg['batch_size']} "
                     f"{cfg['epochs']} epochs x {cfg['samples_per_epoch']} samples, normalize {cfg['normalize']['scheme']}")
        shown = ("planes", "network", "batch_size", "normalize", "loss") if plans.get("encoder") else \
            ("planes", "batch_size", "normalize", "loss")  # the network's reason where it is not the default
        if cfg.get("logit_adjustment") == "both":  # the non-default decision, with its numbers
            shown += ("logit_adjustment",)
        for key in shown:
            if key in plan["reasons"]:
                lines.append(f"    {key}: {plan['reasons'][key]}")
        if "time" in plan:
            t = plan["time"]
            lines.append(f"    expected time: {t['total_min']:.1f} min per fold on {t['device']} ({t['steps']} steps of "
                         f"{t['step_s']:.3f} s: {t['train_min']:.1f} min; validation {t['validation_min']:.1f} min, "
                         f"scoring {t.get('score_s_per_case', 0.0):.1f} s per case)"
                         + (f"; {plan['reasons']['epochs']}" if "--budget" in plan["reasons"].get("epochs", "") else ""))
    return "\n".join(lines)
