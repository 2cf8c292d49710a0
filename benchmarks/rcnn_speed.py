"""End-to-end two-stage detector speed: visionzoo's Faster R-CNN-MobileNetV3-320 and Mask R-CNN-ResNet50-FPN
against torchvision's.

    python benchmarks/rcnn_speed.py [--models fasterrcnn_mobilenet_v3_large_320_fpn,maskrcnn_resnet50_fpn]
                                    [--repeats 5] [--threads 2] [--box-score-thresh 0.05]
                                    [--reference-python PATH] [--onnx] [--json]

Each model runs eagerly, float32, under `torch.inference_mode()`, on one 640x480 image (random pixels),
from the input list to the final detections (transform, backbone, proposals, RoIAlign, box head, NMS per
class, masks pasted into the image). Weights are random, built as for the published weights
(FrozenBatchNorm2d backbones, seeded). At the default `box_score_thresh` of 0.05 (the anchors' setting)
these random weights give Faster R-CNN-MobileNet no detection (it ends after the box head) and Mask
R-CNN its 100 (through the mask head and mask pasting); `--box-score-thresh 0` is the heaviest case:
every proposal and class reaches the per-class NMS (about 90,000 boxes).
Two of ours are timed, interleaved run by run: `eager`, the model as built, and `detect`, the model as
`visionzoo detect` runs it on the torch backend (`tasks.detect.torch_detector`: FrozenBatchNorms folded
into the convolutions and channels-last, `runtime/torch_opt.py`), with whether both gave the same
detections (`compare_detections`, within 1e-3). The median of --repeats runs after a
warm-up is printed next to torchvision's time on this kind of machine (tests/fixtures/tasks/README.md,
default thresholds) and the ratios; `detect` is what a user of visionzoo gets.

With --reference-python (an interpreter with torchvision, e.g. /work/tvenv/bin/python), the same weights
and image also run through torchvision's model in a subprocess right after ours (the fair comparison on
a busy machine), which also reports whether both gave the same detections. Target: no slower than
torchvision.

With --onnx, each model is also exported (`visionzoo.runtime.export.export_model`, the whole detector
in the graph: `runtime/rcnn_graph.py`) and run on ONNX Runtime (CPU, --threads intra-op threads) on the
same image, end to end as `detect --backend onnxruntime` runs it (Mask R-CNN's masks pasted after the
graph); its median time is printed next to ours in PyTorch eager with the ratio, and whether both gave
the same detections (`compare_detections`: the same labels, boxes and scores within 1e-3 of their range,
masks within 1e-3 on average; float32 rounding through ResNet-50-FPN at 800 px moves scores by ~1e-4).
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

from visionzoo.models.detection import rcnn  # noqa: E402
from visionzoo.tasks.detect import torch_detector  # noqa: E402

ANCHORS_MS = {"fasterrcnn_mobilenet_v3_large_320_fpn": 86.0, "maskrcnn_resnet50_fpn": 3536.0}  # torchvision 0.29

REFERENCE = r"""
import json, statistics, sys, time
import torch
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d
folder, threads, repeats, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
thresh = float(sys.argv[5])
torch.set_num_threads(threads)
def build(name):  # as torchvision builds them for their default (COCO) weights
    if name == "fasterrcnn_mobilenet_v3_large_320_fpn":
        body = _mobilenet_extractor(mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, 3)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        return FasterRCNN(body, 91, rpn_anchor_generator=anchors, min_size=320, max_size=640,
                          rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150, rpn_score_thresh=0.05,
                          box_score_thresh=thresh)
    return MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), 91, box_score_thresh=thresh)
image = torch.load(f"{folder}/image.pt")
out = {}
for name in names:
    model = build(name)
    model.load_state_dict(torch.load(f"{folder}/{name}.pt"), strict=True)
    model.eval()
    with torch.inference_mode():
        det = model([image])[0]
        times = []
        for _ in range(repeats):
            t = time.perf_counter(); model([image]); times.append(time.perf_counter() - t)
    out[name] = {"ms": 1e3 * statistics.median(times), "boxes": det["boxes"].tolist(), "labels": det["labels"].tolist()}
print(json.dumps(out))
"""


def build(name: str, box_score_thresh: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return rcnn.MODEL_CLASS(rcnn.VARIANTS[name], box_score_thresh=box_score_thresh).eval()


def same_detections(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    """The same labels, and boxes, scores and masks within 1e-3 (`compare_detections`)."""
    from visionzoo.runtime.detection_graph import compare_detections

    keys = [k for k in ("boxes", "scores", "labels", "masks") if k in expected]
    diffs = compare_detections(tuple(got[k].numpy() for k in keys), tuple(expected[k].numpy() for k in keys))
    return bool(max(diffs[0], diffs[1], *diffs[3:]) <= 1e-3 and diffs[2] == 0)


def time_onnx(name: str, model: torch.nn.Module, image: torch.Tensor, expected: dict[str, torch.Tensor],
              args: argparse.Namespace) -> tuple[float, bool, list[float]]:
    """(median ms, same detections as `expected`, `compare_detections`' differences) of `model` exported to
    ONNX, on ONNX Runtime, end to end."""
    import onnxruntime as ort

    import visionzoo
    from visionzoo.runtime.detection_graph import compare_detections, graph_detections
    from visionzoo.runtime.export import export_model

    described = visionzoo.create_model(name, box_score_thresh=args.box_score_thresh)  # (with the record to export)
    described.load_state_dict(model.state_dict())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as folder:
        path = export_model(described.eval(), "onnx", Path(folder) / f"{name}.onnx", verify=False).path
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run() -> dict[str, torch.Tensor]:
        outputs = session.run(names, {"images": image[None].numpy()})
        return graph_detections([torch.from_numpy(o) for o in outputs], *image.shape[-2:])

    got = run()  # (also the warm-up)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    keys = [k for k in ("boxes", "scores", "labels", "masks") if k in expected]
    diffs = compare_detections(tuple(got[k].numpy() for k in keys), tuple(expected[k].numpy() for k in keys))
    same = max(diffs[0], diffs[1], *diffs[3:]) <= 1e-3 and diffs[2] == 0
    return 1e3 * statistics.median(times), bool(same), [float(f"{d:.3g}") for d in diffs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ANCHORS_MS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--box-score-thresh", type=float, default=0.05, help="0: every candidate reaches NMS")
    parser.add_argument("--reference-python", help="an interpreter with torchvision, to time its models too")
    parser.add_argument("--onnx", action="store_true", help="also time the exported graph on ONNX Runtime")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(0))

    ours, served, served_same, detections, models = {}, {}, {}, {}, {}
    for name in names:
        model = models[name] = build(name, args.box_score_thresh)
        prepared = torch_detector(model)
        with torch.inference_mode():
            detections[name] = model([image])[0]  # (also the warm-ups)
            got = prepared([image])[0]
            times: dict[str, list[float]] = {"eager": [], "detect": []}
            for _ in range(args.repeats):
                t = time.perf_counter()
                model([image])
                times["eager"].append(time.perf_counter() - t)
                t = time.perf_counter()
                prepared([image])
                times["detect"].append(time.perf_counter() - t)
        ours[name], served[name] = (1e3 * statistics.median(times[k]) for k in ("eager", "detect"))
        served_same[name] = same_detections(got, detections[name])

    onnx = {name: time_onnx(name, model, image, detections[name], args) for name, model in models.items()} \
        if args.onnx else {}

    reference = {}
    if args.reference_python:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(image, f"{folder}/image.pt")
            for name, model in models.items():
                torch.save(model.state_dict(), f"{folder}/{name}.pt")
            proc = subprocess.run([args.reference_python, "-c", REFERENCE, folder, str(args.threads),
                                   str(args.repeats), ",".join(names), str(args.box_score_thresh)],
                                  capture_output=True, text=True, check=True)
        reference = json.loads(proc.stdout.strip().splitlines()[-1])

    rows = []
    for name, ms in ours.items():
        row = {"model": name, "detections": int(detections[name]["boxes"].shape[0]), "ours_ms": round(ms, 1),
               "anchor_ms": ANCHORS_MS[name], "ratio_to_anchor": round(ms / ANCHORS_MS[name], 3),
               "detect_ms": round(served[name], 1), "detect_ratio_to_anchor": round(served[name] / ANCHORS_MS[name], 3),
               "detect_same_detections": served_same[name]}
        if reference:
            ref = reference[name]
            same = (ref["labels"] == detections[name]["labels"].tolist()
                    and torch.allclose(torch.tensor(ref["boxes"]).reshape(-1, 4), detections[name]["boxes"],
                                       rtol=1e-4, atol=1e-3))
            row.update(torchvision_ms=round(ref["ms"], 1), ratio_to_torchvision=round(ms / ref["ms"], 3),
                       same_detections=same)
        if onnx:
            row.update(ort_ms=round(onnx[name][0], 1), ratio_ort_to_ours=round(onnx[name][0] / ms, 3),
                       ort_same_detections=onnx[name][1], ort_differences=onnx[name][2])
        rows.append(row)
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "box_score_thresh": args.box_score_thresh,
                          "rows": rows}, indent=1))
        return
    print(f"one 640x480 image, float32, eager, {args.threads} threads, random weights, box_score_thresh "
          f"{args.box_score_thresh}, median of {args.repeats}")
    header = (f"{'model':<38} {'boxes':>5} {'eager ms':>9} {'detect ms':>10} {'same':>5} {'anchor ms':>10} "
              f"{'eager/anchor':>12} {'detect/anchor':>13}")
    if reference:
        header += f" {'torchvision ms':>15} {'ratio':>6} {'same':>5}"
    if onnx:
        header += f" {'ORT ms':>9} {'ORT/ours':>8} {'same':>5} {'max diff':>9}"
    print(header)
    for r in rows:
        line = (f"{r['model']:<38} {r['detections']:>5} {r['ours_ms']:>9.1f} {r['detect_ms']:>10.1f} "
                f"{str(r['detect_same_detections']):>5} {r['anchor_ms']:>10.1f} {r['ratio_to_anchor']:>12.2f} "
                f"{r['detect_ratio_to_anchor']:>13.2f}")
        if reference:
            line += f" {r['torchvision_ms']:>15.1f} {r['ratio_to_torchvision']:>6.2f} {str(r['same_detections']):>5}"
        if onnx:
            line += (f" {r['ort_ms']:>9.1f} {r['ratio_ort_to_ours']:>8.2f} {str(r['ort_same_detections']):>5}"
                     f" {max(r['ort_differences']):>9.2g}")
        print(line)


if __name__ == "__main__":
    main()
