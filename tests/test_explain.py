"""Grad-CAM: the heat map of an object pasted on a plain background peaks inside the object, for the
packaged EfficientNet-Lite0 weights; token maps of ViT and Swin work too; the CLI writes overlays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo import create_model
from visionzoo.errors import InputError
from visionzoo.tasks.explain import Explainer, explain, overlay

from .cli_runner import run_cli

IMAGES = Path(__file__).parent.parent / "examples" / "images"
OBJECT = 200  # side of the pasted object, pixels


@pytest.fixture(scope="module")
def explainer():
    return Explainer(create_model("efficientnet_lite0", weights="DEFAULT"))


def scene(obj: Image.Image, at: tuple[int, int], size: tuple[int, int] = (640, 480)) -> Image.Image:
    canvas = Image.new("RGB", size, (200, 200, 200))
    canvas.paste(obj.resize((OBJECT, OBJECT)), at)
    return canvas


def objects() -> dict[str, Image.Image]:
    cup = Image.open(IMAGES / "coffee.png").convert("RGB").crop((150, 10, 430, 290))
    cat = Image.open(IMAGES / "chelsea.png").convert("RGB").crop((40, 0, 300, 260))
    return {"espresso": cup, "Egyptian cat": cat}


@pytest.mark.parametrize("at", [(380, 200), (80, 60), (100, 250)])
@pytest.mark.parametrize("name", ["espresso", "Egyptian cat"])
def test_heat_map_peaks_inside_the_pasted_object(explainer, name, at):
    img = scene(objects()[name], at)
    result = explainer.explain_image(img)
    assert result.label == name
    assert result.heatmap.shape == (480, 640) and result.heatmap.max() == pytest.approx(1.0, abs=0.01)
    x, y = result.peak
    assert at[0] <= x < at[0] + OBJECT and at[1] <= y < at[1] + OBJECT, (result.peak, at)
    # most of the heat is on the object, not on the plain background around it
    inside = result.heatmap[at[1]:at[1] + OBJECT, at[0]:at[0] + OBJECT].sum()
    assert inside > 0.5 * result.heatmap.sum()


def test_target_by_label_or_index_and_bad_targets(explainer):
    img = scene(objects()["espresso"], (220, 140))
    by_label = explainer.explain_image(img, "Egyptian cat")
    by_index = explainer.explain_image(img, str(by_label.target))
    assert by_label.label == "Egyptian cat" and by_index.target == by_label.target
    assert np.allclose(by_label.heatmap, by_index.heatmap)
    assert by_label.probability < 0.1  # asked for, not predicted
    for bad in ("not a class", "1000", "-1"):
        with pytest.raises(InputError, match="target"):
            explainer.explain_image(img, bad)


def test_overlay_keeps_the_image_where_it_is_cold():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[10:20, 10:20] = 1.0
    out = np.asarray(overlay(img, heat))
    assert (out[0, 0] == (10, 200, 30)).all() and not (out[15, 15] == (10, 200, 30)).all()
    with pytest.raises(InputError, match="heat map"):
        overlay(img, heat[:10])


def _random_head(model) -> None:
    # torchvision initialises ViT's head to zeros: every score, and so every gradient, would be 0
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("arch, stage", [("vit_b_16", "encoder.layers.encoder_layer_10"), ("swin_t", "features.7")])
def test_token_maps_of_vit_and_swin(arch, stage):
    model = create_model(arch, weights=None)
    _random_head(model)
    result = Explainer(model).explain_image(scene(objects()["espresso"], (200, 100)))
    # ViT: the last block's patch tokens never reach the class token, so the one before is used
    assert result.stage == stage
    assert result.heatmap.shape == (480, 640) and result.heatmap.max() > 0


def test_explain_function_and_cli_write_overlays(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    scene(objects()["espresso"], (300, 150)).save(src / "cup.jpg", quality=92)
    (src / "broken.jpg").write_bytes(b"not an image")
    results = explain([src / "cup.jpg"], "efficientnet_lite0", out=tmp_path / "py")
    assert results[0].written == str(tmp_path / "py" / "cup.gradcam.png")
    assert Image.open(results[0].written).size == (640, 480)
    code, out, err = run_cli(capsys, "explain", src, "--model", "efficientnet_lite0", "--target", "espresso",
                             "--out", tmp_path / "cli", "--json")
    assert code == 3, err  # one image explained, one unreadable
    line = json.loads(out.strip().splitlines()[0])
    assert line["label"] == "espresso" and Path(line["written"]).is_file()
    assert "broken.jpg" in err
