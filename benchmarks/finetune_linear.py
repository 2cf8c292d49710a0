"""Linear fine-tuning with cached features vs a naive loop that runs the frozen backbone every epoch.

    python benchmarks/finetune_linear.py [--epochs 30] [--image-size 48] [--threads 1]

On scikit-learn's digits (written as an ImageFolder of 64x64 PNGs, 25% stratified
validation, seed 0) with EfficientNet-Lite0's ImageNet weights, both train the same new
classifier with the same recipe (AdamW, cosine schedule, label smoothing, batch 32, the
best validation epoch kept) for the same number of epochs. `visionzoo.finetune(strategy=
"linear")` computes the backbone's features once; the naive loop decodes, preprocesses
and runs the backbone on every training and validation image in every epoch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/digits.py

import visionzoo  # noqa: E402
from tests.digits import write_digits  # noqa: E402
from visionzoo.data.datasets import open_dataset  # noqa: E402
from visionzoo.train.data import KeyedImages, sample_seed, stratified_split, training_preprocess  # noqa: E402
from visionzoo.train.loop import lr_schedule  # noqa: E402


def naive(data: Path, epochs: int, image_size: int, seed: int = 0) -> tuple[float, list[float]]:
    """The frozen backbone re-run on every image in every epoch; returns (seconds, val accuracy per epoch)."""
    started = time.perf_counter()
    ds = open_dataset(data)
    train_idx, val_idx = stratified_split(ds.targets, 0.25, seed)
    torch.manual_seed(sample_seed(seed, 0))
    net = visionzoo.create_model("efficientnet_lite0", pretrained=True, num_classes=len(ds.classes)).eval()
    pp = training_preprocess(net.preprocess, image_size)
    head = net.get_classifier()
    net.requires_grad_(False)
    head.requires_grad_(True)
    train_set = KeyedImages([ds.samples[i] for i in train_idx], pp, None)
    val_set = KeyedImages([ds.samples[i] for i in val_idx], pp, None)
    steps = -(-len(train_set) // 32)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(epochs * steps, 0))
    val_accs = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for x, y in DataLoader(train_set, sampler=[(i, None) for i in order], batch_size=32):
            with torch.no_grad():
                z = net.forward_head(net.forward_features(x), pre_logits=True)
            loss = F.cross_entropy(head(z), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        correct = 0
        with torch.no_grad():
            for x, y in DataLoader(val_set, sampler=[(i, None) for i in range(len(val_set))], batch_size=64):
                correct += int((net(x).argmax(1) == y).sum())
        val_accs.append(correct / len(val_set))
    return time.perf_counter() - started, val_accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="30: the linear strategy's default")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits")
        print(f"digits: 1347 train / 450 val images, efficientnet_lite0 at {args.image_size}x{args.image_size}, "
              f"{args.epochs} epochs, {torch.get_num_threads()} thread(s), num_workers=0 for both")
        started = time.perf_counter()
        result = visionzoo.finetune(data, Path(tmp) / "run", strategy="linear", epochs=args.epochs,
                                    image_size=args.image_size, num_workers=0, progress=False)
        cached_s = time.perf_counter() - started
        cached_acc = result.metrics["val_acc"]
        print(f"cached features (visionzoo linear): {cached_s:7.1f} s   best val acc {cached_acc:.2%}", flush=True)
        naive_s, accs = naive(data, args.epochs, args.image_size)
        print(f"naive (backbone every epoch):       {naive_s:7.1f} s   best val acc {max(accs):.2%}")
        verdict = "equal or better" if cached_acc >= max(accs) else "LOWER"
        print(f"speed-up: {naive_s / cached_s:.1f}x; accuracy {verdict} with cached features")


if __name__ == "__main__":
    main()
