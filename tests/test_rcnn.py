"""The two-stage detectors beyond parity: builder defaults per variant, training losses, class-head resets,
legacy checkpoint names, mask pasting and keypoints in the output, and input errors."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo import InputError
from visionzoo.models.detection import rcnn
from visionzoo.models.detection.backbones import BackboneWithFPN, resnet_body
from visionzoo.models.detection.fpn import LastLevelMaxPool
from visionzoo.models.detection.roi_heads import (
    KeypointRCNNHeads,
    KeypointRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    keypoints_to_heatmap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(kind: str, **kwargs) -> rcnn.RCNN:
    """A variant's heads on a ResNet-18 pyramid of 64 channels, at 96-128 px: seconds to train."""
    torch.manual_seed(0)
    backbone = BackboneWithFPN(resnet_body("resnet18", trainable_layers=5), (1, 2, 3, 4), 64, LastLevelMaxPool())
    name = {"faster": "fasterrcnn_resnet50_fpn", "mask": "maskrcnn_resnet50_fpn",
            "keypoint": "keypointrcnn_resnet50_fpn"}[kind]
    # few proposals and samples per image: the mask and keypoint heads run on every sampled positive
    small = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                 box_batch_size_per_image=32, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    model = rcnn.RCNN(rcnn.VARIANTS[name], backbone=backbone, **{**small, **kwargs})
    heads = model.roi_heads  # narrower mask and keypoint heads (the full ones are 4 x 256 and 8 x 512 wide)
    if heads.has_mask:
        heads.mask_head = MaskRCNNHeads(64, (32, 32))
        heads.mask_predictor = MaskRCNNPredictor(32, 32, model.num_classes)
    if heads.has_keypoint:
        heads.keypoint_head = KeypointRCNNHeads(64, (32, 32))
        heads.keypoint_predictor = KeypointRCNNPredictor(32, 17)
    return model


def scene(num_keypoints: int = 17):
    """Two images with one or two bright rectangles each, their boxes, masks and keypoints."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) * 0.2, torch.rand(3, 80, 100, generator=g) * 0.2]
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0]]), torch.tensor([[5.0, 5.0, 50.0, 40.0], [60.0, 30.0, 99.0, 79.0]])]
    targets = []
    for image, image_boxes in zip(images, boxes, strict=True):
        masks = torch.zeros((len(image_boxes), *image.shape[1:]), dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, image_boxes.long().tolist(), strict=True):
            m[y1:y2, x1:x2] = 1
            image[:, y1:y2, x1:x2] += 0.7
        centre = (image_boxes[:, :2] + image_boxes[:, 2:]) / 2
        sizes = image_boxes[:, None, 2:] - image_boxes[:, None, :2]
        spread = torch.linspace(-0.3, 0.3, num_keypoints)[None, :, None] * sizes
        keypoints = torch.cat([centre[:, None] + spread, torch.ones(len(image_boxes), num_keypoints, 1)], dim=2)
        targets.append({"boxes": image_boxes, "labels": torch.ones(len(image_boxes), dtype=torch.int64),
                        "masks": masks, "keypoints": keypoints})
    return images, targets


def test_variants_take_their_builders_defaults():
    small = rcnn.RCNN(rcnn.VARIANTS["fasterrcnn_mobilenet_v3_large_320_fpn"])
    assert type(small) is rcnn.FasterRCNN and small.num_classes == 91
    assert (small.transform.min_size, small.transform.max_size) == ((320,), 640)
    assert (small.rpn.pre_nms_top_n.test, small.rpn.post_nms_top_n.test, small.rpn.score_thresh) == (150, 150, 0.05)
    assert (small.rpn.pre_nms_top_n.train, small.rpn.post_nms_top_n.train, small.rpn.nms_thresh) == (2000, 2000, 0.7)
    assert (small.roi_heads.score_thresh, small.roi_heads.nms_thresh, small.roi_heads.detections_per_img) == (
        0.05, 0.5, 100)
    trains = [all(p.requires_grad for p in block.parameters()) for block in small.backbone.body]
    assert trains == [False] * 7 + [True] * 10  # the last 3 of 6 stages (from block 7, stride 16 on) train
    changed = rcnn.RCNN(rcnn.VARIANTS["fasterrcnn_mobilenet_v3_large_320_fpn"], rpn_score_thresh=0.0, min_size=400,
                        box_score_thresh=0.3, box_detections_per_img=7, rpn_post_nms_top_n_test=50)
    assert (changed.rpn.score_thresh, changed.transform.min_size, changed.rpn.post_nms_top_n.test) == (0.0, (400,), 50)
    assert (changed.roi_heads.score_thresh, changed.roi_heads.detections_per_img) == (0.3, 7)
    keypoint = tiny("keypoint")
    assert type(keypoint) is rcnn.KeypointRCNN and keypoint.num_classes == 2 and keypoint.num_keypoints == 17
    assert keypoint.transform.min_size == (96,)  # given; the default is multi-scale:
    assert rcnn.VARIANTS["keypointrcnn_resnet50_fpn"].min_size == (640, 672, 704, 736, 768, 800)
    assert type(tiny("mask")) is rcnn.MaskRCNN


@pytest.mark.parametrize("kind", ["mask", "keypoint"])
def test_training_losses_are_finite_and_decrease(kind):
    model = tiny(kind).train()
    images, targets = scene()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    totals = []
    for _ in range(4):
        losses = model(images, targets)
        expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                    "loss_mask" if kind == "mask" else "loss_keypoint"}
        assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < totals[0], totals
    model.eval()
    with torch.inference_mode():
        det = model([images[0]])[0]
    assert det["boxes"].shape[1] == 4
    if kind == "mask":
        assert det["masks"].shape == (det["boxes"].shape[0], 1, 96, 128)
        assert bool(((det["masks"] >= 0) & (det["masks"] <= 1)).all())
    else:
        assert det["keypoints"].shape == (det["boxes"].shape[0], 17, 3)
        assert det["keypoints_scores"].shape == (det["boxes"].shape[0], 17)


def test_training_without_objects_and_with_bad_targets():
    model = tiny("mask").train()
    images, targets = scene()
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros((0, *img.shape[1:]), dtype=torch.uint8)} for img in images]
    losses = model(images, empty)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_box_reg"].detach()) == 0.0
    with pytest.raises(InputError, match="masks must be a tensor of shape"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    with pytest.raises(InputError, match=r"label 0 is outside \[1, 91\)"):
        model(images, [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets])
    keypoint = tiny("keypoint").train()
    with pytest.raises(InputError, match="keypoints must be a float tensor"):
        keypoint(images, [{**t, "keypoints": t["keypoints"][:, :5]} for t in targets])
    with pytest.raises(InputError, match="num_classes must be an integer >= 2"):
        tiny("faster", num_classes=1)


@pytest.mark.parametrize("kind", ["mask", "keypoint"])
@pytest.mark.parametrize("empty", [{"box_score_thresh": 1.0}, {"rpn_score_thresh": 1.0}], ids=["no-box", "no-proposal"])
def test_no_detections_give_empty_outputs_of_the_right_shapes(kind, empty):
    # no softmax score is above 1; no proposal's sigmoid either, so the box head sees none at all
    model = tiny(kind, **empty).eval()
    images, _ = scene()
    with torch.inference_mode():
        detections = model(images)
    for det, image in zip(detections, images, strict=True):
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)
        if kind == "mask":
            assert det["masks"].shape == (0, 1, *image.shape[1:])
        else:
            assert det["keypoints"].shape == (0, 17, 3) and det["keypoints_scores"].shape == (0, 17)


def test_keypoints_to_heatmap_cells():
    rois = torch.tensor([[0.0, 0.0, 56.0, 28.0]])
    kps = torch.tensor([[[0.5, 0.5, 1.0], [56.0, 28.0, 1.0], [10.0, 10.0, 0.0], [60.0, 5.0, 1.0]]])
    cells, valid = keypoints_to_heatmap(kps, rois, 56)
    # cell (x 0, y 1): the box is half as high as wide; the far corner is the last cell; invisible; outside
    assert cells.tolist() == [[56, 55 * 56 + 55, 0, 0]] and valid.tolist() == [[True, True, False, False]]


def test_reset_classifier_and_legacy_names():
    model = tiny("mask")
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 20
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert model.class_layers[-1] == "roi_heads.mask_predictor.mask_fcn_logits"
    sd = model.state_dict()
    legacy = {k.replace("rpn.head.conv.0.0.", "rpn.head.conv.").replace("roi_heads.mask_head.0.0.",
                                                                          "roi_heads.mask_head.mask_fcn1."): v
              for k, v in sd.items()}
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn1.bias" in legacy
    assert model.adapt_state_dict(legacy).keys() == sd.keys()


def test_registered_with_their_weights_records():
    names = set(visionzoo.list_models(task="detection"))
    assert set(rcnn.VARIANTS) <= names
    assert dict(visionzoo.get_weights("fasterrcnn_resnet50_fpn").builder_kwargs) == {"frozen_bn_eps": 0.0}
    assert dict(visionzoo.get_weights("fasterrcnn_resnet50_fpn_v2").builder_kwargs) == {}
    assert dict(visionzoo.get_weights("keypointrcnn_resnet50_fpn.COCO_LEGACY").builder_kwargs) == {}
    keypoints = visionzoo.get_weights("keypointrcnn_resnet50_fpn")
    assert keypoints.tag == "COCO_V1" and dict(keypoints.builder_kwargs) == {"frozen_bn_eps": 0.0}
    assert keypoints.keypoint_names is not None and len(keypoints.keypoint_names) == 17
    assert keypoints.keypoint_names == rcnn.COCO_PERSON_KEYPOINTS
    assert {a for pair in rcnn.COCO_PERSON_SKELETON for a in pair} == set(keypoints.keypoint_names)
    assert visionzoo.get_weights("maskrcnn_resnet50_fpn").metrics["mask_map"] == 34.6


def test_the_torch_backend_copies_and_folds_an_rcnn_instance():
    """`detect` (`torch_detector`) and `open_runner` on a model instance copy it (R-CNN's class choice in
    `__new__` must survive copy.deepcopy) and fold the copy's FrozenBatchNorms into its convolutions; the
    caller's model is left as it was, and the folded copy computes the same features to float rounding."""
    import copy

    from visionzoo.models.layers import FrozenBatchNorm2d
    from visionzoo.runtime.backends import open_runner
    from visionzoo.tasks.detect import torch_detector

    model = visionzoo.create_model("fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    twin = copy.deepcopy(model)
    assert type(twin) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    folded = torch_detector(model)
    runner = open_runner(model, "torch", precision="fp32", threads=1)
    assert frozen > 0 and sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == frozen
    image = torch.rand(1, 3, 240, 320, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model.backbone(model.transform(list(image))[0].tensors)
        for net in (folded, runner.net):
            assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
            ours = net.backbone(net.transform(list(image))[0].tensors)
            for a, b in zip(*(list(f.values()) if isinstance(f, dict) else list(f) for f in (ours, plain)),
                            strict=True):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
