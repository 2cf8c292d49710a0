"""ONNX, TorchScript and PT2 export: every family of the zoo reproduces PyTorch through ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.errors import ExportError, InputError
from visionzoo.registry import FAMILIES, REGISTRY
from visionzoo.runtime.export import ExportFormat, export_model, load_torch_export, read_onnx_info

from .parity import fill_
from .subset import quick_only

pytest.importorskip("onnxruntime")


def _smallest_of_each_family() -> list[str]:
    """One architecture per family module (the one with the fewest published parameters), plus the
    variants whose code differs within a family: Swin v2, EfficientNetV2, EfficientNet-Lite."""
    best: dict[str, tuple[int, str]] = {}
    for name in REGISTRY.list_models(task="classification"):
        arch = REGISTRY.get_architecture(name)
        params = min((w.num_params for w in arch.weights), default=10**12)
        if arch.family not in best or params < best[arch.family][0]:
            best[arch.family] = (params, name)
    chosen = [best[f][1] for f in CLASSIFIER_FAMILIES]
    return chosen + [n for n in ("swin_v2_t", "efficientnet_v2_s", "efficientnet_lite0") if n not in chosen]


CLASSIFIER_FAMILIES = [f for f in FAMILIES if any(REGISTRY.get_architecture(a).family == f
                                                   for a in REGISTRY.list_models(task="classification"))]
ARCHS = _smallest_of_each_family()


def test_every_family_is_covered():
    families = {REGISTRY.get_architecture(a).family for a in ARCHS}
    assert families == set(CLASSIFIER_FAMILIES)


def informative(net: torch.nn.Module, size: int) -> torch.nn.Module:
    """`net` with outputs worth comparing: a freshly built ViT has an all-zero head, so its logits are 0 for
    every image and every graph, and a fresh GoogLeNet gives two images the same logits; such models get
    the parity fill (deterministic, well-conditioned)."""
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        first = net(x)
        if first.std() == 0 or not (first[0] != first[1]).any():
            fill_(net, seed=0)
        logits = net(x)
    assert logits.std() > 0 and (logits[0] != logits[1]).any(), "outputs that cannot tell graphs apart"
    return net


# exported in seconds (measured on a loaded 2-core machine, <= 8 s each): the quick subset's share
QUICK = {"resnet18", "mobilenet_v3_small", "efficientnet_lite0", "mobilenet_v2", "shufflenet_v2_x0_5", "mnasnet0_5",
         "regnet_y_400mf"}


@pytest.mark.parametrize("arch", quick_only(ARCHS, QUICK))
def test_onnx_export_reproduces_pytorch(arch, tmp_path):
    torch.manual_seed(0)
    net = visionzoo.create_model(arch, weights=None).eval()
    net = informative(net, net.image_size or net.preprocess.crop_size)
    out = tmp_path / f"{arch}.onnx"
    result = export_model(net, "onnx", out)
    assert out.is_file()
    assert set(result.max_rel_diff) == {"logits", "embedding"}
    assert result.worst <= 1e-4, result.max_rel_diff
    info = read_onnx_info(out)
    assert info.arch == arch and info.num_classes == 1000
    assert info.embedding_dim == net.head_hidden_size
    # the batch size is free: run 1 and 5 images through ONNX Runtime against PyTorch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, info.input_size, info.input_size)
        logits, embedding = session.run(["logits", "embedding"], {"images": x.numpy()})
        with torch.inference_mode():
            ref = net(x).numpy()
        assert logits.shape == (batch, 1000) and embedding.shape == (batch, info.embedding_dim)
        assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_metadata_carries_the_preprocessing(tmp_path):
    import onnx

    export_model("efficientnet_lite0", "onnx", tmp_path / "lite0.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "lite0.onnx")).metadata_props}
    recipe = visionzoo.get_weights("efficientnet_lite0").preprocess
    assert json.loads(props["mean"]) == list(recipe.mean) and json.loads(props["std"]) == list(recipe.std)
    assert props["crop_size"] == "224" and props["interpolation"] == "bicubic" and props["resize_size"] == "256"
    classes = json.loads(props["classes"])
    assert len(classes) == 1000 and classes[967] == "espresso"
    record = json.loads(props["visionzoo"])
    assert record["arch"] == "efficientnet_lite0" and record["weights"] == "efficientnet_lite0.IMAGENET1K_V1"


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torch_formats_round_trip(fmt, tmp_path):
    net = visionzoo.create_model("mobilenet_v3_small", weights=None, num_classes=7).eval()
    result = export_model(net, fmt, tmp_path / f"m.{fmt}")
    assert result.format is ExportFormat(fmt) and result.worst <= 1e-5
    module, info = load_torch_export(result.path, fmt)
    assert info.num_classes == 7 and info.arch == "mobilenet_v3_small"
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        logits, embedding = module(x)
        torch.testing.assert_close(logits, net(x), rtol=1e-4, atol=1e-4)
    assert embedding.shape == (4, net.head_hidden_size)


def test_a_failed_check_leaves_no_file(tmp_path):
    out = tmp_path / "lite0.onnx"
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_model("efficientnet_lite0", "onnx", out, tolerance=0.0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_at_another_input_size_scales_the_recipe(tmp_path):
    result = export_model("efficientnet_lite0", "onnx", tmp_path / "lite0_160.onnx", input_size=160)
    info = read_onnx_info(result.path)
    assert info.input_size == 160 and info.preprocess.crop_size == 160
    assert info.preprocess.resize_size == round(256 * 160 / 224)


def test_bad_requests_are_refused_clearly(tmp_path):
    with pytest.raises(InputError, match="unknown export format 'tflite'"):
        export_model("efficientnet_lite0", "tflite", tmp_path / "x")
    with pytest.raises(InputError, match="built for 224x224"):
        export_model(visionzoo.create_model("vit_b_32", weights=None), "onnx", tmp_path / "v.onnx", input_size=256)
