"""Multi-scale feature maps: `create_model(name, features_only=True, out_indices=...)` for every family."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo import InputError
from visionzoo.models.features import FeatureExtractor
from visionzoo.registry import REGISTRY

from .subset import per_family

ARCHS = visionzoo.list_models(task="classification")  # families merged later are covered without edits here


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def _input_size(arch: str) -> int:
    """Small, but at least the weights' minimum (e.g. 224 for ViT's fixed position embeddings).

    Nets whose stems have no padding (AlexNet, Inception v3: minimum 63 and 75 px) shrink a
    minimum-size input to a 1x1 map, so they get twice their minimum.
    """
    w = REGISTRY.get_architecture(arch).default_weights
    smallest = max(w.min_size) if w else 1
    return 2 * smallest if 32 < smallest < 224 else max(64, smallest)


@pytest.mark.parametrize("arch", per_family(ARCHS))
def test_features_only_every_architecture(arch):
    torch.manual_seed(0)
    extractor = visionzoo.create_model(arch, features_only=True)
    model = extractor.model
    assert isinstance(extractor, FeatureExtractor) and not extractor.training
    n = len(model.feature_info)
    assert n >= 1 and extractor.out_indices == tuple(range(n))
    assert extractor.feature_info == model.feature_info
    size = model.image_size or _input_size(arch)  # a ViT takes the one size it was built for
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = extractor(x)
    assert len(maps) == n
    for info, fmap in zip(extractor.feature_info, maps, strict=True):
        assert fmap.ndim == 4 and fmap.shape[0] == 1, (info, fmap.shape)
        assert fmap.shape[1] == info.num_chs, (info, fmap.shape)
        for side in fmap.shape[2:]:  # (test_models checks reductions tightly at a larger size)
            assert abs(size / side - info.reduction) <= info.reduction, (info, fmap.shape)

    # the first stage alone gives the same map and stops early: the deepest stage's module
    # never runs (execution is cut after the last requested stage)
    assert FeatureExtractor(model, out_indices=(0, -1)).out_indices == (0, n - 1)
    only_first = FeatureExtractor(model, out_indices=(0,))
    calls = []
    handle = model.get_submodule(model.feature_info[-1].module).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        first = only_first(x)
    handle.remove()
    assert torch.allclose(first[0], maps[0])
    assert len(calls) == (0 if n > 1 else 1), "truncated execution ran past the requested stage"


def test_pretrained_features_match_forward_features():
    extractor = visionzoo.create_model("efficientnet_lite0", pretrained=True, features_only=True,
                                       out_indices=(2, -1))
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = extractor(x)
        assert torch.allclose(maps[-1], model.forward_features(x), atol=1e-5)
    assert extractor.reductions == [8, 32] and extractor.channels == [40, 1280]
    assert extractor.preprocess == model.preprocess


def test_stage_names_and_bad_indices():
    model = visionzoo.create_model("resnet18")
    assert FeatureExtractor(model, ("layer2", "layer4")).out_indices == (2, 4)
    for bad, match in (((5,), "out of range"), ((-6,), "out of range"), (("layer9",), "no stage 'layer9'"),
                       ((1, -4), "twice"), ((), "empty")):
        with pytest.raises(InputError, match=match):
            FeatureExtractor(model, bad)
    with pytest.raises(InputError, match="features_only=True"):
        visionzoo.create_model("resnet18", out_indices=(1,))
