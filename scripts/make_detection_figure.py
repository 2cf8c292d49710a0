"""Render docs/maskrcnn_shapes.jpg or docs/keypoints_shapes.jpg: `visionzoo detect` with a Mask or
Keypoint R-CNN fine-tuned on the generated shapes.

Usage: python scripts/make_detection_figure.py {masks,keypoints} [OUT] [--bundle BUNDLE] [--work DIR]

Without --bundle it first fine-tunes one as the acceptance tests do (`tests/test_rcnn_finetune.py`,
`tests/test_keypoints.py`: 200 shapes images of 128 x 128 with exact masks or keypoints from
`tests/shapes.py`, seed 0, a Mask or Keypoint R-CNN head on EfficientNet-Lite0 from its ImageNet
weights, two epochs; a minute or two on two CPU cores). The figure shows four new 256 x 256 images
of the shapes (seed 2) on top and, below them, the PNGs `visionzoo detect --threshold 0.8 --out`
draws with that bundle: the boxes, and each instance's mask as an overlay or each shape's keypoints
(top, left, right, bottom) joined by the skeleton the data names.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import visionzoo  # noqa: E402
from tests.shapes import KEYPOINT_RECIPE, MASK_RECIPE, write_boxes  # noqa: E402

SIZE, COUNT, THRESHOLD = 256, 4, 0.8
RECIPES = {"masks": MASK_RECIPE, "keypoints": KEYPOINT_RECIPE}
FIGURES = {"masks": "maskrcnn_shapes.jpg", "keypoints": "keypoints_shapes.jpg"}


def main(kind: str, out: Path, bundle: Path | None, work: Path) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    labels = {kind: True}  # write_boxes(masks=True) or (keypoints=True)
    if bundle is None:
        train = write_boxes(work / "train", 200, seed=0, size=(128, 128), **labels)
        bundle = visionzoo.finetune(train / "instances.json", work / "run", **RECIPES[kind], val_fraction=0.2,
                                    progress=False).bundle
    shown = write_boxes(work / "shown", COUNT, seed=2, size=(SIZE, SIZE), negatives=0.0, **labels)
    images = sorted((shown / "images").glob("*.jpg"))
    found = visionzoo.detect(images, bundle, threshold=THRESHOLD, draw_dir=work / "drawn")
    sheet = Image.new("RGB", (COUNT * SIZE + (COUNT - 1) * 4, 2 * SIZE + 4), (255, 255, 255))
    for k, (path, result) in enumerate(zip(images, found, strict=True)):
        drawn = getattr(result, "drawn", None)
        if drawn is None:
            raise SystemExit(f"{path}: {getattr(result, 'reason', 'no drawing')}")
        sheet.paste(Image.open(path).convert("RGB"), (k * (SIZE + 4), 0))
        sheet.paste(Image.open(drawn).convert("RGB"), (k * (SIZE + 4), SIZE + 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB, bundle {bundle}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(RECIPES), help="a Mask R-CNN (masks) or a Keypoint R-CNN")
    parser.add_argument("out", nargs="?", type=Path, help="default: docs/maskrcnn_shapes.jpg or keypoints_shapes.jpg")
    parser.add_argument("--bundle", type=Path, help="a bundle fine-tuned on such shapes (default: fine-tune one)")
    parser.add_argument("--work", type=Path, help="where the data and the run go (default: a temporary folder)")
    args = parser.parse_args()
    target = args.out or ROOT / "docs" / FIGURES[args.kind]
    if args.work is not None:
        main(args.kind, target, args.bundle, args.work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(args.kind, target, args.bundle, Path(tmp))
