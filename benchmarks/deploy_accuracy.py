"""What int8 quantization and structured pruning cost in accuracy, and what pruning saves.

    python benchmarks/deploy_accuracy.py [--prune-epochs 10] [--ratio 0.3]

1. EfficientNet-Lite0 with its real ImageNet weights, quantized (static int8) on augmented
   shots of the sample photos (scikit-image, matplotlib), then run on the originals and
   *other* augmented shots: the share of images whose top-1 stays the float32 model's
   (target >= 90%), on each runtime.
2. A digits classifier (EfficientNet-Lite0 fine-tuned with the `linear` strategy on
   scikit-learn's digits at 48x48, as in the fine-tuning tests), quantized on 300 of its
   training images: validation accuracy float32 vs int8 (target: at most 1 point lost on
   the backend an int8 file runs on by default, OpenVINO when installed; ONNX Runtime's
   int8 kernels are shown too, and lose somewhat more on this model).
3. The same bundle pruned (--ratio of the channels of every coupled group of convolutions)
   and fine-tuned --prune-epochs epochs: FLOPs (target: >= 25% fewer), latency at batch 32
   on the torch backend (>= 15% lower), validation accuracy (at most 1 point lost).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.digits import write_digits  # noqa: E402
from tests.photos import write_augmented  # noqa: E402
from visionzoo.bundle import read_bundle  # noqa: E402
from visionzoo.runtime.backends import installed_backends, open_runner  # noqa: E402
from visionzoo.runtime.measure import accuracy, describe_machine, load_labelled  # noqa: E402
from visionzoo.tasks.prune import bundle_split, prune  # noqa: E402
from visionzoo.tasks.quantize import predictions, quantize  # noqa: E402


def verdict(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def real_photos(tmp: Path) -> bool:
    q = quantize("efficientnet_lite0", write_augmented(tmp / "calibration", copies=20, seed=1, originals=False),
                 tmp / "lite0.int8.onnx", check=False)
    files = write_augmented(tmp / "eval", copies=15, seed=7)
    reference = predictions(open_runner("efficientnet_lite0", "torch"), files)
    print(f"1. EfficientNet-Lite0 (ImageNet weights), static int8 calibrated on {q.calibration_images} augmented "
          f"photos; {len(files)} other photos (originals and augmented):")
    ok = True
    for backend in installed_backends()[1:]:
        same = float((predictions(open_runner(q.path, backend), files) == reference).mean())
        ok &= same >= 0.9
        print(f"   int8 on {backend.value:<12} keeps the float32 top-1 on {same:6.1%}  (target >= 90%: "
              f"{verdict(same >= 0.9)})")
    return ok


def digits_bundle(tmp: Path) -> Path:
    data = write_digits(tmp / "digits")
    result = visionzoo.finetune(data, tmp / "digits_run", strategy="linear", image_size=48, seed=0, progress=False)
    return result.bundle


def digits_int8(bundle: Path, tmp: Path) -> bool:
    train, val, _ = bundle_split(bundle)
    calibration = [p for p, _ in random.Random(0).sample(train, 300)]
    q = quantize(bundle, calibration, tmp / "digits.int8.onnx", check=False)
    images, labels = load_labelled(val, read_bundle(bundle).preprocess)
    fp32 = accuracy(open_runner(bundle, "torch").logits, images, labels)
    default = open_runner(q.path)  # the backend `predict --model FILE.onnx` picks
    print(f"2. digits bundle ({len(labels)} validation images): float32 {fp32:.2%}")
    ok = True
    for backend in installed_backends()[1:]:
        int8 = accuracy(open_runner(q.path, backend).logits, images, labels)
        if backend is default.backend:
            ok &= int8 >= fp32 - 0.01
            note = f"target >= -1 on the default backend: {verdict(int8 >= fp32 - 0.01)}"
        else:
            note = "not the default backend"
        print(f"   int8 on {backend.value:<12} {int8:.2%}  ({100 * (int8 - fp32):+.2f} points; {note})")
    return ok


def digits_pruned(bundle: Path, tmp: Path, ratio: float, epochs: int) -> bool:
    result = prune(bundle, ratio, out=tmp / "pruned", finetune_epochs=epochs, progress=False)
    b, a = result.before, result.after
    print(f"3. digits bundle pruned ({ratio:.0%} of the channels), fine-tuned {epochs} epochs:")
    print("\n".join("   " + line for line in result.lines()))
    checks = [("FLOPs", 1 - a.macs / b.macs, 0.25), ("latency", 1 - a.latency_ms / b.latency_ms, 0.15)]
    ok = True
    for what, cut, target in checks:
        ok &= cut >= target
        print(f"   {what} cut by {cut:.1%}  (target >= {target:.0%}: {verdict(cut >= target)})")
    lost = b.accuracy - a.accuracy
    ok &= lost <= 0.01
    print(f"   accuracy {100 * -lost:+.2f} points  (target >= -1: {verdict(lost <= 0.01)})")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--prune-epochs", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("TORCH_HOME", str(tmp / "torch_home"))
        ok = real_photos(tmp)
        bundle = digits_bundle(tmp)
        ok &= digits_int8(bundle, tmp)
        ok &= digits_pruned(bundle, tmp, args.ratio, args.prune_epochs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
