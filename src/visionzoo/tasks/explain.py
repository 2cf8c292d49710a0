"""Grad-CAM: where in the image a classifier looked for a class (Selvaraju et al., "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization", ICCV 2017).

    visionzoo explain photo.jpg --model efficientnet_lite0 --out cams/
    explanations = visionzoo.tasks.explain.explain(["photo.jpg"], "efficientnet_lite0", out="cams/")

For any classifier of the zoo: the stage maps come from the model's `feature_info` (through
`format_stage_output`, so the token maps of ViT and Swin become NCHW maps), the score of the
target class is differentiated with respect to them, each channel is weighted by its mean
gradient, and the positive part of the weighted sum is the heat map. The deepest stage whose
map reaches the score is used: for ViT that is the second-to-last block, since the last
block's patch tokens never reach the class token that the head reads.

The heat map covers the centre crop the model saw; it is mapped back onto the full image (the
area outside the crop stays cold) and drawn over it as a colour overlay.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.inputs import Failure, expand_inputs
from ..data.transforms import resized_size
from ..enums import Task
from ..errors import ImageError, InputError
from ..fileutil import atomic_path
from ..models.base import VisionModel, ZooModel
from ..registry import DEFAULT_MODEL

OVERLAY_ALPHA = 0.55  # the heat map's opacity where it is hottest


@dataclass(frozen=True)
class Explanation:
    """The Grad-CAM heat map of one image for one class."""

    path: str
    target: int  # the explained class
    label: str
    probability: float  # the model's probability of that class
    stage: str  # the module whose map was used
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], at the image's full size
    peak: tuple[int, int]  # (x, y) of the hottest pixel
    written: str | None = None  # the overlay file, when written

    def overlay(self, img: Image.Image) -> Image.Image:
        """The heat map drawn over `img` (the image it was computed for)."""
        return overlay(img, self.heatmap)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target, "label": self.label, "probability": self.probability,
                "stage": self.stage, "peak": list(self.peak), "written": self.written}


class Explainer:
    """Grad-CAM for one classifier; `explain_image(img, target)` for a decoded image."""

    def __init__(self, model: VisionModel):
        if not isinstance(model, ZooModel):
            raise InputError(f"Grad-CAM needs a visionzoo classifier, got {type(model).__name__}")
        card = model.require_card()
        if card.task is not Task.CLASSIFICATION:
            raise InputError(f"Grad-CAM explains classifiers; {card.architecture} is a {card.task.value} model")
        if not model.feature_info:
            raise InputError(f"{card.architecture} describes no stages (feature_info); Grad-CAM cannot pick a map")
        self.model = model.eval()
        self.card = card
        self.transform = card.preprocess.transforms()

    def resolve_target(self, target: int | str | None) -> int | None:
        """A class index from an index or a label (None: the most probable class)."""
        if target is None or (isinstance(target, str) and not target.strip()):
            return None
        n = self.model.num_classes
        text = str(target).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < n:
                raise InputError(f"target class {index} is out of range; {self.card.architecture} has {n} classes")
            return index
        classes = self.card.classes or ()
        lowered = [c.lower() for c in classes]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        raise InputError(f"unknown target class {text!r}; give a class index (0-{n - 1}) or one of the model's "
                         f"labels (see `visionzoo info {self.card.architecture}`)")

    def cam(self, x: torch.Tensor, target: int | str | None = None) -> tuple[torch.Tensor, int, float, str]:
        """(heat map over the input in [0, 1] at the last usable stage's resolution, class, probability,
        stage) for one preprocessed input (1, 3, S, S)."""
        model = self.model
        outputs: dict[int, torch.Tensor] = {}

        def hook_for(index: int):
            def hook(module, inputs, output):
                outputs.setdefault(index, output)  # a module called twice: its first call is the stage
            return hook

        infos = model.feature_info
        handles = [model.get_submodule(info.module).register_forward_hook(hook_for(i)) for i, info in enumerate(infos)]
        param = next(model.parameters(), None)
        x = x.to(device=param.device if param is not None else "cpu", dtype=param.dtype if param is not None else None)
        try:
            with torch.enable_grad():
                logits = model(x.requires_grad_(True))
                probs = torch.softmax(logits.detach().float(), dim=1)[0]
                index = self.resolve_target(target)
                index = int(probs.argmax()) if index is None else index
                order = sorted(outputs, reverse=True)
                grads = torch.autograd.grad(logits[0, index], [outputs[i] for i in order], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for i, grad in zip(order, grads, strict=True):
            if grad is None:
                continue
            fmap = model.format_stage_output(i, outputs[i].detach())
            fgrad = model.format_stage_output(i, grad)
            if fgrad.abs().max() == 0:
                continue  # this stage does not reach the score (ViT's last block): go one shallower
            weights = fgrad.float().mean(dim=(2, 3), keepdim=True)
            heat = torch.relu((weights * fmap.float()).sum(dim=1))[0]
            top = heat.max()
            heat = heat / top if top > 0 else heat
            return heat.cpu(), index, float(probs[index]), infos[i].module
        raise RuntimeError(f"{self.card.architecture}: no stage of feature_info reaches the class score")

    def explain_image(self, img: Image.Image, target: int | str | None = None, path: str = "") -> Explanation:
        """Grad-CAM of a decoded image (from `load_image`), mapped onto the full image."""
        resize, crop = self.card.preprocess.resize_size, self.card.preprocess.crop_size
        if resize is None or crop is None:
            raise InputError(f"{self.card.architecture}: Grad-CAM maps its heat back through a resize and a centre "
                             f"crop, and this preprocessing lacks one")
        heat, index, probability, stage = self.cam(self.transform(img)[None], target)
        full = _to_image_frame(heat.numpy(), img.size, resize, crop)
        y, x = np.unravel_index(int(full.argmax()), full.shape)
        classes = self.card.classes
        label = classes[index] if classes else f"class_{index}"
        return Explanation(path, index, label, probability, stage, full, (int(x), int(y)))


def _to_image_frame(heat: np.ndarray, size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """The heat map of the centre crop placed where that crop lies in the original image
    (the inverse of the resize-shorter-side + centre-crop preprocessing)."""
    w, h = size
    rw, rh = resized_size(w, h, resize)
    scale_x, scale_y = w / rw, h / rh
    # the crop in resized coordinates (as center_crop computes it; a small image is padded instead)
    left, top = round((rw - crop) / 2.0), round((rh - crop) / 2.0)
    bx0, by0 = int(round(left * scale_x)), int(round(top * scale_y))
    bx1, by1 = int(round((left + crop) * scale_x)), int(round((top + crop) * scale_y))
    full = np.zeros((h, w), dtype=np.float32)
    x0, y0, x1, y1 = max(0, bx0), max(0, by0), min(w, bx1), min(h, by1)
    if x1 <= x0 or y1 <= y0:
        return full
    up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((bx1 - bx0, by1 - by0),
                                                                              Image.Resampling.BILINEAR))
    full[y0:y1, x0:x1] = up[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return np.clip(full, 0.0, 1.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as RGB uint8 on a blue-cyan-yellow-red scale (cold to hot)."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 160], [0, 200, 230], [250, 230, 40], [220, 20, 20]], dtype=np.float32)
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(img: Image.Image, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """`heatmap` (H, W in [0, 1], the image's size) drawn over `img`, more opaque where hotter."""
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    if heatmap.shape != base.shape[:2]:
        raise InputError(f"the heat map is {heatmap.shape[1]}x{heatmap.shape[0]}, the image "
                         f"{base.shape[1]}x{base.shape[0]}; draw a heat map over the image it was computed for")
    a = (alpha * np.sqrt(heatmap))[..., None]
    mixed = base * (1 - a) + colormap(heatmap).astype(np.float32) * a
    return Image.fromarray(mixed.round().astype(np.uint8), mode="RGB")


def explain(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
            model: str | os.PathLike | VisionModel = DEFAULT_MODEL, target: int | str | None = None, *,
            out: str | os.PathLike | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
            ) -> list[Explanation | Failure]:
    """Grad-CAM heat maps of images for `target` (a class index or label; None: each image's top
    class). With `out`, each overlay is written to `OUT/<stem>.gradcam.png`. Unreadable inputs come
    back as `Failure`s, like `predict`'s."""
    from ..factory import resolve_model

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    net = resolve_model(model)
    explainer = Explainer(net)  # Explainer checks the kind itself
    explainer.resolve_target(target)  # a bad target fails before any image is read
    files, failures = expand_inputs(list(inputs))
    results: list[Explanation | Failure] = list(failures)
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for f in files:
        try:
            img = load_image(f, max_pixels=max_pixels)
        except ImageError as e:
            results.append(Failure(str(f), e.reason))
            continue
        result = explainer.explain_image(img, target, path=str(f))
        if folder is not None:
            name = _unique(f"{Path(f).stem}.gradcam.png", used)
            dest = folder / name
            with atomic_path(dest) as tmp:
                result.overlay(img).save(tmp, "PNG")
            result = dataclasses.replace(result, written=str(dest))
        results.append(result)
    return results


def _unique(name: str, used: set[str]) -> str:
    stem, suffix = name.split(".", 1)
    candidate, n = name, 1
    while candidate in used:
        candidate = f"{stem}_{n}.{suffix}"
        n += 1
    used.add(candidate)
    return candidate
