"""The common interface on every architecture: features, head, new classifier, stages."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.models import ZooModel
from visionzoo.models.layers import StochasticDepth
from visionzoo.registry import REGISTRY

from .subset import per_family, quick_only

ARCHS = visionzoo.list_models(task="classification")


# checked at their native size: an unpadded stem makes small inputs' deepest maps (3x3 at 160
# for Inception v3) too coarse for the reduction check below
NATIVE_SIZE = {"inception_v3": 299}
# above this many GFLOPs (of the default weights) the check runs on 64x64 inputs, where every
# stage down to stride 32 still has a map; it keeps CI time in check for the largest models
HEAVY_GFLOPS = 10.0


def _input_size(arch: str) -> int:
    if arch in NATIVE_SIZE:
        return NATIVE_SIZE[arch]
    if REGISTRY.get_architecture(arch).family == "swin_transformer":
        return 128  # any multiple of its patch size works (maps are padded to whole windows); 224+ is slow
    w = REGISTRY.get_architecture(arch).default_weights
    base = 64 if w is not None and (w.gflops or 0) > HEAVY_GFLOPS else 160
    return max(base, max(w.min_size) if w else base)


def _fast_build_kwargs(arch: str) -> dict:
    """ViTs take one fixed image size, and ViT-L/H at 224 would make this test slow: build
    them for a 4x4 patch grid (the interface does not depend on the grid size)."""
    entry = REGISTRY.get_architecture(arch)
    if entry.family == "vision_transformer":
        return {"image_size": 4 * entry.config.patch_size}
    return {}


@pytest.mark.parametrize("arch", per_family(ARCHS))
def test_common_interface(arch):
    torch.manual_seed(0)
    model = visionzoo.create_model(arch, num_classes=7, **_fast_build_kwargs(arch))
    assert isinstance(model, ZooModel) and not model.training
    size = model.image_size or _input_size(arch)
    x = torch.randn(2, 3, size, size)

    # the stage outputs seen through hooks (as NCHW maps) agree with feature_info
    seen = {}

    def record(index, name):
        def hook(module, inputs, output):
            seen.setdefault(name, model.format_stage_output(index, output).shape)
        return hook

    hooks = [model.get_submodule(info.module).register_forward_hook(record(i, info.module))
             for i, info in enumerate(model.feature_info)]
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    for h in hooks:
        h.remove()
    # a feature map (B, C, H, W), or tokens (B, L, C) for ViT
    assert feats.shape[1 if feats.ndim == 4 else -1] == model.num_features
    assert pooled.shape == (2, model.head_hidden_size)
    assert logits.shape == (2, 7) and model.num_classes == 7
    with torch.no_grad():
        assert torch.allclose(model(x), logits)
    reductions = [info.reduction for info in model.feature_info]
    assert reductions == sorted(reductions) and model.feature_info[-1].num_chs == model.num_features
    for info in model.feature_info:
        shape = seen[info.module]
        assert len(shape) == 4 and shape[1] == info.num_chs, info
        assert abs(size / shape[-1] - info.reduction) <= info.reduction / 2, (info, shape)

    # a correctly sized new head, on the model's dtype
    model.reset_classifier(3)
    head = model.get_classifier()
    assert (head.in_features if isinstance(head, nn.Linear) else head.in_channels) == model.head_hidden_size
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size)


# learning rates at which a few plain SGD steps are small enough to reduce the loss; GoogLeNet,
# Inception v3 and MNASNet start with very steep gradients (their stems, their initial logits),
# so at 1e-3 their steps overshoot and the outcome depends on rounding (thread count)
TRAIN_LR = {"resnet18": 1e-3, "vgg11_bn": 1e-3, "alexnet": 1e-2, "squeezenet1_1": 1e-2, "mobilenet_v2": 1e-3,
            "efficientnet_lite0": 1e-3, "efficientnet_b0": 1e-3, "efficientnet_v2_s": 1e-3,
            "densenet121": 1e-3, "googlenet": 1e-5, "inception_v3": 1e-6, "mobilenet_v3_small": 1e-2,
            "mnasnet0_5": 1e-5, "shufflenet_v2_x0_5": 1e-3, "regnet_y_400mf": 1e-3, "convnext_tiny": 1e-3,
            "vit_b_16": 1e-2, "swin_t": 1e-2, "maxvit_t": 1e-2}
# input sizes other than 96, small but valid for the architecture: Inception v3 at 96 ends on
# 1x1 maps, where batch statistics over 4 samples make every step erratic; MaxViT needs 7x7
# partitions at stride 32
TRAIN_SIZE = {"vgg11_bn": 64, "alexnet": 64, "inception_v3": 128, "maxvit_t": 224}
TRAIN_KWARGS = {"vit_b_16": {"image_size": 96}}  # a ViT is built for its input size


# the quick subset trains the light ones (each under ~3 s quiet); the rest run in the full suite
TRAIN_QUICK = {"resnet18", "alexnet", "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
               "shufflenet_v2_x0_5", "regnet_y_400mf"}


@pytest.mark.parametrize("arch", quick_only(sorted(TRAIN_LR), TRAIN_QUICK))
def test_training_steps_reduce_the_loss(arch):
    torch.manual_seed(0)
    model = visionzoo.create_model(arch, num_classes=4, **TRAIN_KWARGS.get(arch, {})).train()
    for m in model.modules():  # deterministic steps: no dropout, no stochastic depth
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.p = 0.0
    size = TRAIN_SIZE.get(arch, 96)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR[arch])
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(model(x), y).item())
    assert losses[-1] < losses[0], losses


def test_lite_same_padding_handles_any_input_size():
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    with torch.no_grad():
        for size in (224, 225, 97, 300):
            assert model.forward_features(torch.randn(1, 3, size, size)).shape[-1] == -(-size // 32)


def test_reset_classifier_rejects_bad_sizes():
    model = visionzoo.create_model("resnet18")
    with pytest.raises(visionzoo.InputError):
        model.reset_classifier(-1)
    with pytest.raises(visionzoo.InputError):
        model.reset_classifier(2.5)  # type: ignore[arg-type]


def test_in_chans_changes_the_first_convolution():
    model = visionzoo.create_model("resnet18", in_chans=1)
    assert model.get_submodule(model.first_conv).in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_torchvision_style_builders():
    model = visionzoo.models.resnet18(num_classes=10)
    assert model.arch == "resnet18" and model.num_classes == 10
    assert "resnet50" in dir(visionzoo.models)
    with pytest.raises(AttributeError):
        visionzoo.models.resnet9000  # noqa: B018
