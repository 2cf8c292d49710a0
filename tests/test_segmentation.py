"""Segmentation models beyond parity: the auxiliary head switch and its checkpoints, new class
heads, the training loss, in-place dilation, and the heads on other classifiers of the zoo."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionzoo
from visionzoo import InputError
from visionzoo.enums import Task
from visionzoo.models import mobilenetv3, resnet
from visionzoo.models.base import FeatureInfo, ZooModel
from visionzoo.models.segmentation import (
    MODEL_CLASS,
    VARIANTS,
    HeadKind,
    SegmentationModel,
    StageTaps,
    dilate_,
    segmentation_loss,
    segmentation_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def published(name: str, **kwargs) -> SegmentationModel:
    torch.manual_seed(0)
    return MODEL_CLASS(VARIANTS[name], **kwargs).eval()


# -- the published architectures ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_logits_at_the_input_size_for_odd_sizes(name):
    model = published(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 97, 131))
    heads = ["aux", "out"] if name.startswith("deeplabv3") else ["out"]
    assert sorted(out) == heads
    assert all(v.shape == (2, 21, 97, 131) for v in out.values())
    assert model.num_classes == 21 and model.task is Task.SEGMENTATION


def test_aux_loss_false_drops_the_head_and_still_loads_a_checkpoint_with_it(caplog):
    full = published("deeplabv3_mobilenet_v3_large")
    sd = full.state_dict()
    assert any(k.startswith("aux_classifier.") for k in sd)
    lean = published("deeplabv3_mobilenet_v3_large", aux_loss=False)
    assert lean.aux_classifier is None and not any(k.startswith("aux_classifier.") for k in lean.state_dict())

    with caplog.at_level(logging.INFO, logger="visionzoo"):
        adapted = lean.adapt_state_dict(sd)
    lines = [r.getMessage() for r in caplog.records if r.name == "visionzoo"]
    assert len(lines) == 1 and "auxiliary classifier" in lines[0] and "aux_loss=False" in lines[0]
    assert set(adapted) == set(lean.state_dict())
    lean.load_state_dict(adapted, strict=True)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert sorted(lean(x)) == ["out"]
        assert torch.equal(lean(x)["out"], full(x)["out"])
    # a model with its aux head, or a checkpoint without one, is left alone (and nothing is logged)
    caplog.clear()
    assert full.adapt_state_dict(sd) is sd
    assert lean.adapt_state_dict(adapted) is adapted
    assert not caplog.records


def test_lraspp_has_no_auxiliary_head():
    assert published("lraspp_mobilenet_v3_large", aux_loss=None).aux_classifier is None
    with pytest.raises(InputError, match="aux_loss=False"):
        MODEL_CLASS(VARIANTS["lraspp_mobilenet_v3_large"], aux_loss=True)


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "4"])
def test_num_classes_is_validated(bad):
    with pytest.raises(InputError, match="num_classes"):
        MODEL_CLASS(VARIANTS["lraspp_mobilenet_v3_large"], num_classes=bad)
    with pytest.raises(InputError, match="num_classes"):
        published("lraspp_mobilenet_v3_large").reset_classifier(bad)


@pytest.mark.parametrize("name, layers", [
    ("deeplabv3_mobilenet_v3_large", ("classifier.4", "aux_classifier.4")),
    ("lraspp_mobilenet_v3_large", ("classifier.low_classifier", "classifier.high_classifier")),
])
def test_reset_classifier_replaces_only_the_class_layers(name, layers):
    model = published(name).double()
    assert model.class_layers == layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    assert model.num_classes == 5
    after = model.state_dict()
    changed = {k.rpartition(".")[0] for k in after if after[k].shape != before[k].shape}
    assert changed == set(layers)
    assert all(torch.equal(after[k], before[k]) for k in after if k.rpartition(".")[0] not in layers)
    assert all(model.get_submodule(n).weight.dtype == torch.float64 for n in layers)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47, dtype=torch.float64))
    assert all(v.shape == (1, 5, 33, 47) for v in out.values())


def test_stage_taps_return_the_named_layers_in_the_order_asked():
    layers = [(str(i), nn.Conv2d(1, 1, 1, bias=False)) for i in range(4)]
    for _, conv in layers:
        nn.init.constant_(conv.weight, 2.0)
    taps = StageTaps(layers, ("2", "0"))
    assert list(dict(taps.named_children())) == ["0", "1", "2"]  # the layers after the last tap are left out
    two, zero = taps(torch.ones(1, 1, 2, 2))
    assert torch.equal(two, torch.full((1, 1, 2, 2), 8.0)) and torch.equal(zero, torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError):
        StageTaps(layers, ("9",))


# -- the loss ------------------------------------------------------------------------------------------
def _targets(n=2, h=9, w=11, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n, h, w), generator=g)
    target[:, :2] = 255  # an ignored band
    return target


def test_segmentation_loss_is_torchvisions_recipe():
    g = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 4, 9, 11, generator=g), torch.randn(2, 4, 9, 11, generator=g)
    target = _targets()
    expected = F.cross_entropy(out, target, ignore_index=255) + 0.5 * F.cross_entropy(aux, target, ignore_index=255)
    assert torch.allclose(segmentation_loss({"out": out, "aux": aux}, target), expected, rtol=1e-6)
    assert torch.allclose(segmentation_loss({"out": out}, target), F.cross_entropy(out, target, ignore_index=255),
                          rtol=1e-6)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert torch.allclose(segmentation_loss({"out": out, "aux": aux}, target, aux_weight=0.25, class_weights=weights),
                          F.cross_entropy(out, target, weight=weights, ignore_index=255)
                          + 0.25 * F.cross_entropy(aux, target, weight=weights, ignore_index=255), rtol=1e-6)
    target0 = target.clone()
    target0[target0 == 255] = 0  # another ignore index
    assert torch.allclose(segmentation_loss({"out": out}, target0, ignore_index=0),
                          F.cross_entropy(out, target0, ignore_index=0), rtol=1e-6)


def test_segmentation_loss_of_a_batch_without_labelled_pixels_is_zero_not_nan():
    out = torch.randn(1, 3, 4, 5, requires_grad=True)
    target = torch.full((1, 4, 5), 255)
    assert F.cross_entropy(out, target, ignore_index=255).isnan()  # what the plain call gives
    loss = segmentation_loss({"out": out}, target, class_weights=torch.ones(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(out.grad, torch.zeros_like(out))


@pytest.mark.parametrize("outputs, target, kwargs, match", [
    ({"logits": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 4, 4, dtype=torch.long), {}, "'out'"),
    ({"out": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 4, 4), {}, "integer class indices"),
    ({"out": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 1, 4, 4, dtype=torch.long), {}, r"\(N, H, W\)"),
    ({"out": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 4, 5, dtype=torch.long), {}, r"\(1, 4, 4\)"),
    ({"out": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 4, 4, dtype=torch.long), {"class_weights": torch.ones(4)},
     "one weight per class"),
])
def test_segmentation_loss_rejects_mismatched_inputs(outputs, target, kwargs, match):
    with pytest.raises(InputError, match=match):
        segmentation_loss(outputs, target, **kwargs)


# -- dilation in place -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, arch, flag", [
    (resnet, "resnet50", {"replace_stride_with_dilation": (False, True, True)}),
    (mobilenetv3, "mobilenet_v3_large", {"dilated": True}),
])
def test_dilating_in_place_equals_building_dilated(family, arch, flag):
    torch.manual_seed(0)
    model = family.MODEL_CLASS(family.VARIANTS[arch]).eval()
    built = family.MODEL_CLASS(family.VARIANTS[arch], **flag).eval()
    built.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 75, 99)
    with torch.no_grad():
        before = model.forward_features(x)
        assert dilate_(model) and dilate_(model)  # a second call changes nothing
        assert model.feature_info == built.feature_info
        assert before.shape != built.forward_features(x).shape
        assert torch.equal(model.forward_features(x), built.forward_features(x))


def test_basic_block_resnets_and_other_families_keep_their_strides():
    for arch in ("resnet18", "efficientnet_lite0"):
        model = visionzoo.create_model(arch)
        info = list(model.feature_info)
        assert not dilate_(model) and model.feature_info == info


# -- the heads on any classifier of the zoo --------------------------------------------------------------
BACKBONES = ["efficientnet_lite0", "resnet18", "mobilenet_v3_large", "convnext_tiny"]


@pytest.mark.parametrize("arch", BACKBONES)
@pytest.mark.parametrize("head", list(HeadKind))
def test_heads_on_zoo_backbones_give_logits_at_odd_input_sizes(arch, head):
    torch.manual_seed(0)
    aux = head is not HeadKind.LRASPP
    model = segmentation_model(visionzoo.create_model(arch), head.value, num_classes=3, aux_loss=aux).eval()
    assert model.num_classes == 3 and model.head is head
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 101))
    assert sorted(out) == (["aux", "out"] if aux else ["out"])
    assert all(v.shape == (1, 3, 75, 101) for v in out.values())
    assert not any(k.startswith(f"backbone.model.{model.backbone.model.classifier_name}.")
                   for k in model.state_dict())  # the classifier's class layer is gone


def _synthetic_batch(n=2, size=64, seed=0):
    """Images with a bright rectangle on noise; the label map marks the rectangle (class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    target = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, top:top + size // 2, left:left + size // 2] += 1.5
        target[i, top:top + size // 2, left:left + size // 2] = 1
    target[:, :, :2] = 255  # a band of ignored pixels, as VOC's borders
    return x, target


@pytest.mark.parametrize("arch, head", [("efficientnet_lite0", "lraspp"), ("resnet18", "fcn"),
                                        ("mobilenet_v3_large", "deeplabv3"), ("convnext_tiny", "lraspp")])
def test_a_few_optimiser_steps_lower_the_loss(arch, head):
    torch.manual_seed(0)
    model = segmentation_model(visionzoo.create_model(arch), head, num_classes=2, aux_loss=head != "lraspp")
    model.train()
    x, target = _synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = segmentation_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_generic_deeplabv3_on_resnet50_is_the_published_network():
    """On a ResNet-50 the generic path dilates the same strides and taps the same stages as
    deeplabv3_resnet50: same tensors under `backbone.model.`, same outputs."""
    torch.manual_seed(0)
    generic = segmentation_model(visionzoo.create_model("resnet50"), "deeplabv3", aux_loss=True).eval()
    ours = published("deeplabv3_resnet50")
    sd = {k.replace("backbone.model.", "backbone.", 1): v for k, v in generic.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 67, 83)
    with torch.no_grad():
        a, b = generic(x), ours(x)
    assert sorted(a) == sorted(b) == ["aux", "out"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class _NoStride8(ZooModel):
    """A classifier whose stages skip stride 8 (as ViT's: all at 16)."""

    classifier_name = "fc"
    first_conv = "stem"

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.stage = nn.Conv2d(8, 16, 4, 4)
        self.fc = nn.Linear(16, 10)
        self.num_classes, self.num_features = 10, 16
        self.feature_info = [FeatureInfo("stem", 8, 4), FeatureInfo("stage", 16, 16)]

    def forward_features(self, x):
        return self.stage(self.stem(x))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)


def test_generic_constructor_rejects_what_cannot_work():
    with pytest.raises(InputError, match="stride 8"):
        segmentation_model(_NoStride8(), "lraspp")
    with pytest.raises(InputError, match="aux_loss=False"):
        segmentation_model(_NoStride8(), "lraspp", aux_loss=True)
    with pytest.raises(InputError, match="segmentation head"):
        segmentation_model(_NoStride8(), "unet")
    with pytest.raises(InputError, match="visionzoo classifier"):
        segmentation_model(nn.Conv2d(3, 3, 1), "fcn")
    model = segmentation_model(_NoStride8(), "fcn", num_classes=2, aux_loss=True)  # FCN needs no stride-8 stage
    assert model(torch.randn(1, 3, 48, 48))["aux"].shape == (1, 2, 48, 48)
