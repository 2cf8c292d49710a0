"""The video classifiers' interface (features, head, new classifier, stages) and the clip sizes
each accepts or refuses. Small clips and randomly initialised weights: parity is in
test_video_parity.py."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from visionzoo.enums import Task
from visionzoo.errors import InputError
from visionzoo.models import mvit, s3d, swin3d, video_resnet
from visionzoo.models.features import FeatureExtractor
from visionzoo.models.layers import relative_position_index, set_fused_attention
from visionzoo.weights.lean import build_meta

# one build per family (and the three ResNet variants, which differ in time): builder arguments,
# a clip size it takes, and the batch (S3D's smallest clip is already 13x209x209)
CASES = {
    "r3d_18": (video_resnet, {}, (16, 32, 32), 2),
    "mc3_18": (video_resnet, {}, (16, 32, 32), 2),
    "r2plus1d_18": (video_resnet, {}, (16, 32, 32), 2),
    "s3d": (s3d, {}, (13, 209, 209), 1),  # the smallest clip its 2x7x7 head pooling takes
    "swin3d_t": (swin3d, {}, (5, 46, 62), 2),  # not whole patches, not whole windows
    "mvit_v1_b": (mvit, {"temporal_size": 2, "spatial_size": (32, 32)}, (2, 32, 32), 2),
    "mvit_v2_s": (mvit, {"temporal_size": 2, "spatial_size": (32, 32)}, (2, 32, 32), 2),
}


def _build(name: str, **kwargs) -> torch.nn.Module:
    family, build_kwargs = CASES[name][:2]
    torch.manual_seed(0)
    return family.MODEL_CLASS(family.VARIANTS[name], **{**build_kwargs, **kwargs}).eval()


@functools.cache
def _shared(name: str) -> torch.nn.Module:
    """One 7-class build per case for the whole module (random init is most of a small test's
    time); tests that change a model change a copy."""
    return _build(name, num_classes=7)


def _meta(name: str, **kwargs) -> torch.nn.Module:
    """The model on the meta device: shapes flow through it at no cost."""
    return build_meta(lambda: _build(name, **kwargs))


def _clip(name: str) -> torch.Tensor:
    _, _, thw, batch = CASES[name]
    return torch.randn(batch, 3, *thw, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_video_interface(name):
    model = copy.deepcopy(_shared(name))
    assert model.task is Task.VIDEO and model.num_classes == 7
    x = _clip(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
        stages = FeatureExtractor(model)(x)
        assert torch.equal(model(x), logits)
    b = x.shape[0]
    assert logits.shape == (b, 7) and pooled.shape == (b, model.head_hidden_size)
    # a clip map (B, C, T, H, W), or MViT's tokens (B, 1 + THW, C)
    assert feats.shape[-1 if name.startswith("mvit") else 1] == model.num_features
    assert model.feature_info[-1].num_chs == model.num_features
    for info, stage in zip(model.feature_info, stages, strict=True):
        assert stage.ndim == 5 and stage.shape[1] == info.num_chs, info
        assert abs(x.shape[-1] / stage.shape[-1] - info.reduction) <= info.reduction / 2, (info, stage.shape)
    assert model.get_submodule(model.first_conv).in_channels == 3

    model.double().reset_classifier(5)  # a new head on the model's dtype
    assert all(p.dtype == torch.float64 for p in model.get_classifier().parameters())
    model.float()
    with torch.no_grad():
        assert model.forward_head(feats).shape == (b, 5)
        model.reset_classifier(0)  # no head: the pooled embedding
        assert torch.allclose(model.forward_head(feats), pooled)


def test_video_resnets_differ_in_time_only_as_their_convolutions_do():
    """R3D and R(2+1)D halve the frames in stages 2-4; MC3's spatial-only stages keep them."""
    x = torch.empty(1, 3, 16, 112, 112, device="meta")
    shapes = {name: tuple(_meta(name).forward_features(x).shape) for name in ("r3d_18", "mc3_18", "r2plus1d_18")}
    assert shapes == {"r3d_18": (1, 512, 2, 7, 7), "mc3_18": (1, 512, 16, 7, 7), "r2plus1d_18": (1, 512, 2, 7, 7)}


def test_swin3d_takes_clips_of_any_size():
    model = _shared("swin3d_t")
    with torch.no_grad():
        for thw in ((1, 4, 4), (3, 30, 17)):
            x = torch.randn(1, 3, *thw)
            stages = FeatureExtractor(model)(x)
            logits = model(x)
            assert logits.shape == (1, 7) and torch.isfinite(logits).all()
            # the patch embedding pads to whole 2x4x4 patches; merging halves height and width only
            t, h, w = -(-thw[0] // 2), -(-thw[1] // 4), -(-thw[2] // 4)
            for i, stage in enumerate(stages):
                assert stage.shape[2:] == (t, -(-h // 2 ** i), -(-w // 2 ** i))


def test_swin3d_window_fits_short_sides_and_takes_the_top_left_bias_block():
    attn = swin3d.ShiftedWindowAttention3d(12, (8, 7, 7), (4, 3, 3), num_heads=2)
    assert attn.fit_window((4, 28, 9)) == ((4, 7, 7), (0, 3, 3))
    assert attn.fit_window((8, 7, 5)) == ((8, 7, 5), (0, 0, 0))
    assert attn.relative_position_index.shape == (392, 392)
    full, small = attn.relative_position_bias(), attn.relative_position_bias((4, 7, 7))
    assert small.shape == (2, 196, 196) and torch.equal(small, full[:, :196, :196])


def test_relative_position_index_in_three_dimensions():
    index = relative_position_index(2, 3, 4)
    coords = torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4))
    i, j = 5, 17
    dt, dh, dw = (coords[i] - coords[j]).tolist()
    assert index[i, j] == ((dt + 1) * 5 + dh + 2) * 7 + dw + 3
    assert index.unique().numel() == 3 * 5 * 7 and index.max() == 3 * 5 * 7 - 1


@pytest.mark.parametrize("name", ["mvit_v1_b", "mvit_v2_s"])
def test_mvit_takes_only_the_clip_size_it_was_built_for(name):
    model = _meta(name)
    for thw in ((4, 32, 32), (2, 32, 48), (2, 16, 16)):
        with pytest.raises(InputError, match="built for clips of 2 frames of 32x32"):
            model(torch.empty(1, 3, *thw, device="meta"))
    default = _meta(name, temporal_size=16, spatial_size=(224, 224))  # torchvision's, the published weights'
    assert default(torch.empty(1, 3, 16, 224, 224, device="meta")).shape == (1, 400)
    with pytest.raises(InputError, match="built for clips of 16 frames of 224x224"):
        default(torch.empty(1, 3, 8, 224, 224, device="meta"))


def test_mvit_fused_and_explicit_attention_agree():
    """The relative-position bias reaches the fused kernel as it does the explicit path."""
    model = copy.deepcopy(_shared("mvit_v2_s"))
    x = _clip("mvit_v2_s")[:1]
    with torch.no_grad():
        fused = model(x)
        explicit = set_fused_attention(model, False)(x)
    assert torch.allclose(fused, explicit, rtol=0, atol=1e-5 * fused.abs().max().item())


def test_s3d_takes_clips_down_to_the_size_its_head_pools():
    model = _meta("s3d")
    for thw in ((13, 209, 209), (16, 224, 224), (32, 256, 320)):
        assert model(torch.empty(1, 3, *thw, device="meta")).shape == (1, 400)
    for thw in ((12, 209, 209), (13, 208, 224), (8, 112, 112)):
        with pytest.raises(InputError, match="at least 13 frames of 209x209"):
            model(torch.empty(1, 3, *thw, device="meta"))


@pytest.mark.parametrize("name", ["r3d_18", "swin3d_t"])
def test_video_models_refuse_images(name):
    with pytest.raises(InputError, match=r"\(N, C, T, H, W\)"):
        _meta(name)(torch.empty(1, 3, 32, 32, device="meta"))
