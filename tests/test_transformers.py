"""Transformer families: resolution changes (ViT position-embedding resampling, Swin and
MaxViT input sizes), the fused/explicit attention switch, and derived buffers."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import visionzoo
from visionzoo.errors import InputError
from visionzoo.models.layers import resample_pos_embed, set_fused_attention
from visionzoo.registry import REGISTRY

from .photos import sample_image
from .subset import quick_only


def _build(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return REGISTRY.get_architecture(arch).build(**kwargs).eval()


def _smooth(rows: torch.Tensor, cols: torch.Tensor, channels: int) -> torch.Tensor:
    """A low-frequency field per channel, deliberately not symmetric in (row, column)."""
    c = torch.arange(channels, dtype=torch.float64) / channels
    r, q = rows[..., None], cols[..., None]
    return torch.sin(math.pi * (0.9 * r + c)) + 0.6 * torch.cos(math.pi * (0.4 * q - c)) + 0.8 * r * q ** 2


def _grid_values(n: int, channels: int) -> torch.Tensor:
    """`_smooth` at the patch centres of an n x n grid over the unit square: (n*n, C), row-major."""
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return _smooth(rows, cols, channels).reshape(n * n, channels)


@pytest.mark.parametrize(("old", "new"), [(14, 24), (24, 14)])
def test_resampled_position_embeddings_follow_the_function_they_sample(old, new, caplog):
    """ViT-B/16 at 224 (14x14 patches) -> 384 (24x24), and back: the resampled grid matches the
    same smooth function sampled on the new grid within 5% of its range; class token kept."""
    channels = 768
    model = _build("vit_b_16", image_size=16 * new)
    class_pos = torch.randn(1, 1, channels)
    pos = torch.cat([class_pos, _grid_values(old, channels).float()[None]], dim=1)
    state = {"encoder.pos_embedding": pos}
    with caplog.at_level(logging.INFO, logger="visionzoo"):
        out = model.adapt_state_dict(state)["encoder.pos_embedding"]
    assert f"from a {old}x{old} to a {new}x{new} patch grid" in caplog.text
    assert out.shape == (1, new * new + 1, channels) and out.dtype == pos.dtype
    assert torch.equal(out[:, :1], class_pos)

    expected = _grid_values(new, channels)
    spread = expected.max() - expected.min()
    error = (out[0, 1:].double() - expected).abs().max()
    assert error <= 0.05 * spread, (error, spread)
    # the test can tell rows from columns: the transposed grid is far off
    transposed = expected.view(new, new, channels).transpose(0, 1).reshape(new * new, channels)
    assert (out[0, 1:].double() - transposed).abs().max() > 0.2 * spread


def test_resample_keeps_row_major_patch_order():
    # a grid that only varies along columns must stay that way
    grid = torch.arange(4.0).repeat(3, 1)  # 3 rows x 4 columns, value = column
    pos = torch.cat([torch.zeros(1, 1, 1), grid.reshape(1, 12, 1)], dim=1)
    out = resample_pos_embed(pos, (3, 4), (6, 8))[0, 1:, 0].view(6, 8)
    assert torch.allclose(out, out[:1].expand(6, 8))
    assert (out[0, 1:] > out[0, :-1]).all()


def test_vit_built_at_384_from_224_weights_runs_end_to_end(tmp_path, caplog):
    source = _build("vit_b_16")  # image_size 224: 14x14 position embeddings
    path = tmp_path / "vit_b_16_224.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="visionzoo"):
        model = visionzoo.create_model("vit_b_16", weights=str(path), image_size=384)
    assert "from a 14x14 to a 24x24 patch grid" in caplog.text
    assert "encoder.pos_embedding: (1, 197, 768) -> (1, 577, 768)" in " ".join(model.load_report.adapted)
    pos = model.encoder.pos_embedding
    assert pos.shape == (1, 24 * 24 + 1, 768)
    assert torch.equal(pos[:, 0], source.encoder.pos_embedding[:, 0])
    assert torch.equal(model.conv_proj.weight, source.conv_proj.weight)
    assert model.preprocess.crop_size == 384 and model.preprocess.resize_size == 439  # 256/224 kept
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
    (result,) = visionzoo.predict([sample_image("coffee.png")], model=model, topk=3)
    assert len(result.top) == 3
    with pytest.raises(InputError, match="built for 384x384 inputs, got 224x224"):
        model(torch.randn(1, 3, 224, 224))


def test_vit_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(InputError, match="multiple of 16"):
        REGISTRY.get_architecture("vit_b_16").build(image_size=200)


def test_vit_stage_maps_keep_patch_positions():
    model = _build("vit_b_32", image_size=96)  # 3x3 patches
    tokens = torch.zeros(1, 10, 768)
    for r in range(3):
        for c in range(3):
            tokens[0, 1 + 3 * r + c] = 10 * r + c
    fmap = model.format_stage_output(0, tokens)
    assert fmap.shape == (1, 768, 3, 3)
    assert fmap[0, 5].tolist() == [[0, 1, 2], [10, 11, 12], [20, 21, 22]]


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
def test_swin_runs_at_other_input_sizes(arch):
    # 288x192: stage maps 72x48 .. 9x6, none a multiple of the window (7 / 8): padded and shifted
    model = _build(arch)
    shapes = []
    hooks = [model.get_submodule(info.module).register_forward_hook(
        lambda m, i, out, idx=idx: shapes.append(tuple(model.format_stage_output(idx, out).shape)))
        for idx, info in enumerate(model.feature_info)]
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 288, 192))
    for h in hooks:
        h.remove()
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert shapes == [(1, 96, 72, 48), (1, 192, 36, 24), (1, 384, 18, 12), (1, 768, 9, 6)]


@pytest.mark.parametrize("size", [(226, 224), (2, 2)])
def test_swin_rejects_sizes_that_are_not_whole_patches(size):
    model = _build("swin_t")
    with pytest.raises(InputError, match="multiples of its patch size 4"):
        model(torch.randn(1, 3, *size))


def test_maxvit_input_sizes():
    model = _build("maxvit_t")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 224)).shape == (1, 1000)
    with pytest.raises(InputError, match="multiples of 224"):
        model(torch.randn(1, 3, 256, 256))


@pytest.mark.parametrize(("arch", "kwargs", "size"), quick_only(
    [("vit_b_16", {"image_size": 64}, 64), ("swin_t", {}, 96), ("swin_v2_t", {}, 96), ("maxvit_t", {}, 224)],
    {"vit_b_16", "swin_t"}))  # Swin v2's and MaxViT's attention: 14 and 23 s on a busy machine
def test_fused_and_explicit_attention_agree(arch, kwargs, size):
    model = _build(arch, **kwargs).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    switches = [m for m in model.modules() if hasattr(m, "fused")]
    assert switches and all(m.fused for m in switches)
    with torch.no_grad():
        fused = model(x)
        set_fused_attention(model, False)
        assert not any(m.fused for m in switches)
        explicit = model(x)
    assert (fused - explicit).abs().max() <= 1e-10 * explicit.abs().max()
    assert not any(m.fused for m in _build(arch, fused_attention=False, **kwargs).modules() if hasattr(m, "fused"))


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t", "maxvit_t"])
def test_derived_buffers_are_recomputed_after_a_meta_build(arch):
    reference = {k: v for k, v in _build(arch).double().state_dict().items()
                 if k.endswith(("relative_position_index", "relative_coords_table"))}
    with torch.device("meta"):
        model = REGISTRY.get_architecture(arch).build().double()
    model = model.to_empty(device="cpu")
    model.init_computed_buffers()
    state = model.state_dict()
    assert reference and all(torch.equal(state[k], v) for k, v in reference.items())
