"""End-to-end detector speed: visionzoo's SSDlite320-MobileNetV3 and RetinaNet-ResNet50-FPN against
torchvision's.

    python benchmarks/detection_speed.py [--models ssdlite320_mobilenet_v3_large,retinanet_resnet50_fpn]
                                         [--repeats 10] [--threads 2] [--reference-python PATH] [--json]

Each model runs eagerly, float32, under `torch.inference_mode()`, on one 640x480 image (random
pixels), from the input list to the final detections (transform, backbone, heads, decoding, NMS,
boxes mapped back). Weights are random (speed does not depend on their values; the number of
boxes reaching NMS does, and with random weights SSDlite's score threshold lets every box of every
class through, the heaviest case). The median of --repeats runs after a warm-up is printed next to
torchvision's time on this kind of machine (tests/fixtures/tasks/README.md) and the ratio.

With --reference-python (an interpreter with torchvision, e.g. /work/tvenv/bin/python), the same
weights and image are also run through torchvision's model in a subprocess right after ours (the
fair comparison on a busy machine), which also reports whether both gave the same detections.
Target: no slower than torchvision.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visionzoo.models.detection import retinanet, ssdlite  # noqa: E402

ANCHORS_MS = {"ssdlite320_mobilenet_v3_large": 44.0, "retinanet_resnet50_fpn": 2585.0}  # torchvision 0.29, 2 threads
FAMILIES = {"ssdlite320_mobilenet_v3_large": ssdlite, "retinanet_resnet50_fpn": retinanet}

REFERENCE = r"""
import json, statistics, sys, time
import torch
from torchvision.models.detection import RetinaNet, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models import resnet50
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
folder, threads, repeats, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
torch.set_num_threads(threads)
def build(name):
    if name == "ssdlite320_mobilenet_v3_large":
        return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    # as torchvision builds it for its default (COCO) weights: FrozenBatchNorm2d in the backbone
    body = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(body, 91)
image = torch.load(f"{folder}/image.pt")
out = {}
for name in names:
    model = build(name)
    model.load_state_dict(torch.load(f"{folder}/{name}.pt"), strict=True)
    model.eval()
    with torch.inference_mode():
        det = model([image])[0]
        model([image])
        times = []
        for _ in range(repeats):
            t = time.perf_counter(); model([image]); times.append(time.perf_counter() - t)
    out[name] = {"ms": 1e3 * statistics.median(times), "boxes": det["boxes"].tolist(), "labels": det["labels"].tolist()}
print(json.dumps(out))
"""


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    family = FAMILIES[name]
    return family.MODEL_CLASS(family.VARIANTS[name]).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", help="an interpreter with torchvision, to time its models too")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(0))

    ours, detections, models = {}, {}, {}
    for name in names:
        model = models[name] = build(name)
        with torch.inference_mode():
            detections[name] = model([image])[0]
            model([image])
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model([image])
                times.append(time.perf_counter() - t)
        ours[name] = 1e3 * statistics.median(times)

    reference = {}
    if args.reference_python:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(image, f"{folder}/image.pt")
            for name, model in models.items():
                torch.save(model.state_dict(), f"{folder}/{name}.pt")
            proc = subprocess.run([args.reference_python, "-c", REFERENCE, folder, str(args.threads),
                                   str(args.repeats), ",".join(names)], capture_output=True, text=True, check=True)
        reference = json.loads(proc.stdout.strip().splitlines()[-1])

    rows = []
    for name, ms in ours.items():
        row = {"model": name, "detections": int(detections[name]["boxes"].shape[0]), "ours_ms": round(ms, 1),
               "anchor_ms": ANCHORS_MS[name], "ratio_to_anchor": round(ms / ANCHORS_MS[name], 3)}
        if reference:
            ref = reference[name]
            same = (ref["labels"] == detections[name]["labels"].tolist()
                    and torch.allclose(torch.tensor(ref["boxes"]).reshape(-1, 4), detections[name]["boxes"],
                                       rtol=1e-4, atol=1e-3))
            row.update(torchvision_ms=round(ref["ms"], 1), ratio_to_torchvision=round(ms / ref["ms"], 3),
                       same_detections=same)
        rows.append(row)
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))
        return
    print(f"one 640x480 image, float32, eager, {args.threads} threads, random weights, median of {args.repeats}")
    header = f"{'model':<31} {'boxes':>5} {'ours ms':>9} {'anchor ms':>10} {'ratio':>6}"
    if reference:
        header += f" {'torchvision ms':>15} {'ratio':>6} {'same':>5}"
    print(header)
    for r in rows:
        line = (f"{r['model']:<31} {r['detections']:>5} {r['ours_ms']:>9.1f} {r['anchor_ms']:>10.1f} "
                f"{r['ratio_to_anchor']:>6.2f}")
        if reference:
            line += f" {r['torchvision_ms']:>15.1f} {r['ratio_to_torchvision']:>6.2f} {str(r['same_detections']):>5}"
        print(line)


if __name__ == "__main__":
    main()
