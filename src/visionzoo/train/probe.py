"""`--strategy auto`: choose how much of the network to fine-tune from the data itself.

Two quick linear probes on a sample of the training images (at most ~600, scored on a
held-out third of it): one on the pre-trained features, one on the raw pixels (the
preprocessed image pooled to 16x16). A large gap means the pre-trained features transfer
to this data; no gap means they are no better than pixels and the backbone must adapt.
Together with the number of images per class:

    features probe >= 97%                 -> linear   (the classifier alone is enough)
    < 15 images per class                 -> linear   (too few to tune the backbone)
    features - pixels < 5 points          -> full     (features do not transfer: adapt all layers)
    >= 500 images per class               -> full     (enough data to tune everything)
    otherwise                             -> partial  (features transfer; adapt the last stages)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..data.images import DEFAULT_LIMITS, DecodeLimits
from ..data.preprocess import Preprocess
from ..models.base import ZooModel
from .config import Strategy
from .data import KeyedImages, stratified_split

PROBE_IMAGES = 600
LINEAR_IF_FEATURES = 0.97
FEW_PER_CLASS = 15
TRANSFER_GAP = 0.05
MANY_PER_CLASS = 500
PIXEL_GRID = 16


@dataclass(frozen=True)
class StrategyChoice:
    strategy: Strategy
    reason: str  # one sentence: what was measured and why it led to this strategy
    feature_acc: float | None  # linear probe on pre-trained features (held-out accuracy)
    pixel_acc: float | None  # linear probe on raw pixels
    images_per_class: float


def choose_strategy(model: ZooModel, samples: Sequence[tuple], num_classes: int, preprocess: Preprocess, *,
                    seed: int, unfreeze: int, device: torch.device, num_workers: int = 0,
                    limits: DecodeLimits = DEFAULT_LIMITS) -> StrategyChoice:
    per_class = len(samples) / num_classes
    feats, pixels, labels = _probe_inputs(model, samples, num_classes, preprocess, seed, device, num_workers,
                                          limits)
    train, test = stratified_split(labels.tolist(), 1 / 3, seed)
    if not train or not test:
        return StrategyChoice(Strategy.LINEAR, f"only {len(samples)} training images: too few to probe or to "
                              f"fine-tune the backbone, so only the classifier is trained", None, None, per_class)
    f_acc = _probe(feats, labels, train, test, num_classes)
    p_acc = _probe(pixels, labels, train, test, num_classes)
    return decide(f_acc, p_acc, per_class, held_out=len(test), unfreeze=unfreeze)


def decide(f_acc: float, p_acc: float, per_class: float, *, held_out: int, unfreeze: int) -> StrategyChoice:
    """The rules of the module docstring, applied to the two probes' held-out accuracies and the
    number of training images per class."""
    probes = (f"a linear probe scores {f_acc:.1%} on the pre-trained features and {p_acc:.1%} on raw pixels "
              f"({held_out} held-out training images)")
    n = f"{per_class:.0f} images per class"
    if f_acc >= LINEAR_IF_FEATURES:
        return StrategyChoice(Strategy.LINEAR, f"{probes}: the pre-trained features already separate the "
                              f"classes, so training the classifier on them is enough", f_acc, p_acc, per_class)
    if per_class < FEW_PER_CLASS:
        return StrategyChoice(Strategy.LINEAR, f"only {n}: too few to fine-tune the backbone without "
                              f"overfitting, so only the classifier is trained ({probes})", f_acc, p_acc, per_class)
    if f_acc - p_acc < TRANSFER_GAP:
        verdict = "no better than" if f_acc <= p_acc else "hardly better than"
        return StrategyChoice(Strategy.FULL, f"{probes}: the pre-trained features are {verdict} pixels on this "
                              f"data, so every layer is fine-tuned ({n})", f_acc, p_acc, per_class)
    if per_class >= MANY_PER_CLASS:
        return StrategyChoice(Strategy.FULL, f"{n} is enough data to fine-tune every layer ({probes})",
                              f_acc, p_acc, per_class)
    return StrategyChoice(Strategy.PARTIAL, f"{probes}: the features transfer, and {n} is enough to adapt the "
                          f"last {unfreeze} stages but not the whole network", f_acc, p_acc, per_class)


def _probe_inputs(model, samples, num_classes, preprocess, seed, device, num_workers, limits):
    """Pre-trained features and pooled pixels of a class-balanced sample of the training images."""
    targets = np.asarray([y for _, y in samples])
    rng = np.random.default_rng(seed)
    cap = max(4, PROBE_IMAGES // num_classes)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        chosen += sorted(rng.permutation(idx)[:cap].tolist())
    dataset = KeyedImages([samples[i] for i in chosen], preprocess, None, limits)
    keys = [(i, None) for i in range(len(chosen))]
    feats, pixels = [], []
    model.eval()
    with torch.inference_mode():
        for x, _ in DataLoader(dataset, sampler=keys, batch_size=64, num_workers=num_workers):
            x = x.to(device)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            pixels.append(F.adaptive_avg_pool2d(x, PIXEL_GRID).flatten(1).cpu())
    return torch.cat(feats), torch.cat(pixels), torch.as_tensor(targets[chosen])


def _probe(x: torch.Tensor, y: torch.Tensor, train: list[int], test: list[int], num_classes: int) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised inputs, L-BFGS)."""
    xtr, ytr, xte, yte = x[train].double(), y[train], x[test].double(), y[test]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / len(train)  # scikit-learn's default strength (C = 1)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == yte).double().mean())
