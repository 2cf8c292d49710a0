"""Detection models beyond parity: the transform and anchors, training losses, heads on any classifier,
class-head resets, legacy checkpoint names, and input errors."""
from __future__ import annotations

import math

import pytest
import torch

import visionzoo
from visionzoo import InputError
from visionzoo.models.detection import DetectionTransform, ImageBatch, retinanet, ssd, ssdlite
from visionzoo.models.detection.anchors import AnchorGenerator, DefaultBoxGenerator
from visionzoo.models.detection.backbones import freeze_resnet_layers, resnet_body
from visionzoo.models.detection.composed import detector_from_classifier
from visionzoo.models.layers import FrozenBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 100, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0], [60.0, 30.0, 99.0, 79.0]]),
                "labels": torch.tensor([2, 3])}]
    return images, targets


def composed(arch: str, head: str, num_classes: int = 5):
    torch.manual_seed(0)
    sizes = dict(size=128) if head == "ssdlite" else dict(min_size=96, max_size=128)
    return detector_from_classifier(visionzoo.create_model(arch), head, num_classes, **sizes)


def test_transform_resizes_batches_and_maps_back():
    transform = DetectionTransform(100, 150, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    batch, _ = transform([torch.full((3, 60, 90), 0.75), torch.full((3, 50, 200), 0.75)])
    assert batch.image_sizes == [(100, 150), (37, 150)]  # 100/60 = 150/90; then the long side caps at 150
    assert batch.tensors.shape == (2, 3, 128, 160)  # padded up to multiples of 32
    torch.testing.assert_close(batch.tensors[0, :, :100, :150], torch.ones(3, 100, 150))  # (0.75 - 0.5) / 0.25
    assert torch.all(batch.tensors[0, :, 100:] == 0) and torch.all(batch.tensors[1, :, 37:] == 0)
    det = [{"boxes": torch.tensor([[0.0, 0.0, 150.0, 100.0]])}, {"boxes": torch.tensor([[0.0, 0.0, 150.0, 37.0]])}]
    back = transform.postprocess(det, batch.image_sizes, [(60, 90), (50, 200)])
    torch.testing.assert_close(back[0]["boxes"], torch.tensor([[0.0, 0.0, 90.0, 60.0]]))
    torch.testing.assert_close(back[1]["boxes"], torch.tensor([[0.0, 0.0, 200.0, 50.0]]))
    fixed = DetectionTransform(300, 300, (0.0,) * 3, (1.0,) * 3, size_divisible=1, fixed_size=(300, 300)).eval()
    batch, _ = fixed([torch.rand(3, 60, 90)])
    assert batch.tensors.shape == (1, 3, 300, 300) and batch.image_sizes == [(300, 300)]


def test_transform_scales_training_targets():
    transform = DetectionTransform(100, 1000, (0.0,) * 3, (1.0,) * 3).train()
    target = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "labels": torch.tensor([1])}
    _, targets = transform([torch.rand(3, 50, 80)], [target])
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    assert target["boxes"][0, 0] == 10.0  # the caller's target is untouched


def test_anchor_generator():
    generator = AnchorGenerator([(32,), (64,)], [(0.5, 1.0, 2.0), (1.0,)])
    assert generator.num_anchors_per_location() == [3, 1]
    cell = AnchorGenerator.cell_anchors((32,), (0.5, 1.0, 2.0))
    assert cell.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    batch = ImageBatch(torch.zeros(2, 3, 64, 96), [(64, 96), (60, 90)])
    anchors = generator(batch, [torch.zeros(2, 8, 2, 3), torch.zeros(2, 8, 1, 2)])
    assert len(anchors) == 2 and anchors[0].shape == (2 * 3 * 3 + 2, 4)
    # second cell of the first row: shifted by the stride (96 / 3 = 32) in x
    assert anchors[0][3].tolist() == [32 - 23.0, -11.0, 32 + 23.0, 11.0]
    assert anchors[0][-1].tolist() == [48 - 32.0, -32.0, 48 + 32.0, 32.0]  # stride 48 on the 1 x 2 map


def test_default_box_generator_ssd300():
    generator = DefaultBoxGenerator([(2,), (2, 3)], scales=[0.07, 0.15, 0.33], steps=[8, 16])
    assert generator.num_anchors_per_location() == [4, 6]
    batch = ImageBatch(torch.zeros(1, 3, 300, 300), [(300, 300)])
    boxes = generator(batch, [torch.zeros(1, 1, 38, 38), torch.zeros(1, 1, 19, 19)])[0]
    assert boxes.shape == (38 * 38 * 4 + 19 * 19 * 6, 4)
    # first cell centre 0.5 / 37.5 of the image (4 px); first box 0.07 of the image wide
    torch.testing.assert_close(boxes[0], torch.tensor([4 - 10.5, 4 - 10.5, 4 + 10.5, 4 + 10.5]))
    second = 300 * math.sqrt(0.07 * 0.15)
    torch.testing.assert_close(boxes[1], torch.tensor([4 - second / 2, 4 - second / 2, 4 + second / 2,
                                                       4 + second / 2]))


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssdlite"])
def test_heads_on_any_classifier(arch, head):
    num_classes = 5
    model = composed(arch, head, num_classes).eval()
    assert isinstance(model, visionzoo.models.detection.DetectionModel)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())  # frozen
    images, targets = images_and_targets()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images, strict=True):
        assert set(det) == {"boxes", "scores", "labels"}
        n = det["boxes"].shape[0]
        assert det["scores"].shape == det["labels"].shape == (n,)
        if n:
            assert det["boxes"][:, 2].max() <= image.shape[2] and det["boxes"][:, 3].max() <= image.shape[1]
            assert det["labels"].max() < num_classes
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.regression_head.module_list[0][1].weight.grad is not None if head == "ssdlite" \
        else model.head.regression_head.bbox_reg.weight.grad is not None


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssdlite"])
def test_a_few_steps_lower_the_loss(head):
    model = composed("resnet18", head, num_classes=4).train()
    images, targets = images_and_targets()
    # small steps: the backbone is random (no weights), its frozen statistics do not normalise it
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-5)
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_ssdlite320_trains():
    model = ssdlite.SSDLite(ssdlite.VARIANTS["ssdlite320_mobilenet_v3_large"], num_classes=4).train()
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()


def _bad(mutate):
    images, targets = images_and_targets()
    mutate(images, targets)
    return images, targets


BAD_TARGETS = {
    "outside": lambda i, t: t[0].update(boxes=torch.tensor([[10.0, 20.0, 140.0, 90.0]])),
    "negative": lambda i, t: t[0].update(boxes=torch.tensor([[-1.0, 20.0, 40.0, 90.0]])),
    "degenerate": lambda i, t: t[0].update(boxes=torch.tensor([[10.0, 20.0, 10.0, 90.0]])),
    "shape": lambda i, t: t[0].update(boxes=torch.tensor([10.0, 20.0, 60.0, 90.0])),
    "int boxes": lambda i, t: t[0].update(boxes=torch.tensor([[10, 20, 60, 90]])),
    "label count": lambda i, t: t[0].update(labels=torch.tensor([1, 2])),
    "label too large": lambda i, t: t[0].update(labels=torch.tensor([4])),
    "float labels": lambda i, t: t[0].update(labels=torch.tensor([1.0])),
    "missing labels": lambda i, t: t[0].pop("labels"),
    "target count": lambda i, t: t.pop(),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_targets_raise_input_error(case, _small_retinanet):
    images, targets = _bad(BAD_TARGETS[case])
    with pytest.raises(InputError):
        _small_retinanet.train()(images, targets)


def test_ssd_background_label_is_not_a_target():
    model = composed("resnet18", "ssdlite", num_classes=4).train()
    images, targets = images_and_targets()
    targets[0]["labels"] = torch.tensor([0])
    with pytest.raises(InputError, match="label 0"):
        model(images, targets)


@pytest.fixture(scope="module")
def _small_retinanet():
    return composed("resnet18", "retinanet", num_classes=4)


def test_input_errors(_small_retinanet):
    model = _small_retinanet.eval()
    with pytest.raises(InputError, match="targets"):
        model.train()(images_and_targets()[0])
    model.eval()
    for bad in (torch.rand(3, 64, 64), [torch.rand(64, 64)], [torch.randint(0, 255, (3, 64, 64))],
                [torch.rand(1, 64, 64)], []):
        with pytest.raises(InputError):
            model(bad)
    with pytest.raises(InputError, match="detection head"):
        detector_from_classifier(visionzoo.create_model("resnet18"), "yolo", 3)
    with pytest.raises(InputError, match="any image size"):
        detector_from_classifier(visionzoo.create_model("vit_b_16"), "fcos", 3)
    with pytest.raises(InputError, match="num_classes"):
        model.reset_classifier(0)


def test_batch_tensor_input_equals_list(_small_retinanet):
    model = _small_retinanet.eval()
    model.score_thresh = 0.0
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        as_batch, as_list = model(x), model(list(x))
    for a, b in zip(as_batch, as_list, strict=True):
        assert a["boxes"].shape[0] > 0
        for key in a:
            assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssdlite"])
def test_reset_classifier(head):
    model = composed("resnet18", head, num_classes=5).double().eval()
    model.reset_classifier(8)
    assert model.num_classes == 8
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.score_thresh = 0.0
    with torch.no_grad():
        det = model([torch.rand(3, 64, 64, dtype=torch.float64)])[0]
    assert det["labels"].max() >= 5  # the new classes are scored
    if head != "ssdlite":
        logits = model.head.classification_head.cls_logits
        assert logits.out_channels == model.anchor_generator.num_anchors_per_location()[0] * 8


def test_reset_classifier_on_the_torchvision_families():
    torch.manual_seed(0)
    model = ssd.SSD(ssd.VARIANTS["ssd300_vgg16"], num_classes=3)
    model.reset_classifier(21)
    assert [c.out_channels for c in model.head.classification_head.module_list] == [84, 126, 126, 126, 84, 84]
    lite = ssdlite.SSDLite(ssdlite.VARIANTS["ssdlite320_mobilenet_v3_large"])
    lite.reset_classifier(21)
    assert [b[1].out_channels for b in lite.head.classification_head.module_list] == [126] * 6
    assert lite.head.classification_head.num_columns == 21


def test_legacy_checkpoint_names_are_renamed():
    """torchvision's published RetinaNet/FCOS files predate `inner_blocks.i.0` and `conv.i.0` names."""
    model = retinanet.RetinaNet(retinanet.VARIANTS["retinanet_resnet50_fpn"])
    current = model.state_dict()
    legacy = {}
    for key, value in current.items():
        key = key.replace("inner_blocks.0.0.", "inner_blocks.0.").replace("layer_blocks.2.0.", "layer_blocks.2.")
        for i in range(4):
            key = key.replace(f"_head.conv.{i}.0.", f"_head.conv.{2 * i}.")
        legacy[key] = value
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "head.classification_head.conv.6.bias" in legacy
    adapted = model.adapt_state_dict(legacy)
    assert sorted(adapted) == sorted(current)
    model.load_state_dict(adapted, strict=True)


def test_backbone_freezing():
    body = resnet_body("resnet18", frozen_norm=True, trainable_layers=3)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    trained = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}
    freeze_resnet_layers(body, 0)
    assert not any(p.requires_grad for p in body.parameters())
    with pytest.raises(InputError):
        freeze_resnet_layers(body, 6)


def test_torchvision_builder_defaults():
    """The arguments and defaults of torchvision's builders (with their default weights)."""
    lite = ssdlite.SSDLite(ssdlite.VARIANTS["ssdlite320_mobilenet_v3_large"])
    assert (lite.num_classes, lite.score_thresh, lite.nms_thresh, lite.detections_per_img, lite.topk_candidates) \
        == (91, 0.001, 0.55, 300, 300)
    assert lite.transform.image_mean == (0.5, 0.5, 0.5) and lite.transform.fixed_size == (320, 320)
    vgg = ssd.SSD(ssd.VARIANTS["ssd300_vgg16"], score_thresh=0.2)
    assert (vgg.score_thresh, vgg.nms_thresh, vgg.detections_per_img, vgg.topk_candidates) == (0.2, 0.45, 200, 400)
    assert vgg.neg_to_pos_ratio == 3.0
    frozen = [p.requires_grad for p in vgg.backbone.features.parameters()]
    assert frozen[:4] == [False] * 4 and all(frozen[4:])  # conv1_x frozen (trainable_backbone_layers=4)


def test_registered_detectors_and_heads_through_the_factory():
    """The published detectors are registered with their weights records (and the build settings those
    imply); the heads go on any classifier named by `backbone=`, normalising with its weights' values."""
    names = set(visionzoo.list_models(task="detection"))
    assert {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
            "ssdlite320_mobilenet_v3_large", "retinanet", "fcos", "ssdlite"} <= names
    w = visionzoo.get_weights("retinanet_resnet50_fpn")
    assert w.tag == "COCO_V1" and dict(w.builder_kwargs) == {"frozen_bn_eps": 0.0}
    assert w.num_classes == 91 and w.categories[1] == "person" and w.categories[12] == "N/A"
    assert w.preprocess.kind == "ObjectDetection" and w.metrics["box_map"] == 36.4
    model = visionzoo.create_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert isinstance(model, ssdlite.SSDLite) and model.num_classes == 3 and model.card.task.value == "detection"
    head = visionzoo.create_model("ssdlite", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=4,
                                  size=128)
    assert head.card.preprocess.kind == "ObjectDetection" and head.card.preprocess.mean == (0.0, 0.0, 0.0)
    assert head.transform.image_mean == (0.5, 0.5, 0.5)  # the backbone weights' normalisation, done once
    assert head.card.builder_kwargs == {"backbone": "efficientnet_lite0", "size": 128}
    with torch.inference_mode():
        det = head([torch.rand(3, 100, 120)])[0]
    assert det["boxes"].shape[1] == 4 and det["labels"].max() < 4
