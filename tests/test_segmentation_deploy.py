"""Segmentation models on the deployment path: ONNX (and TorchScript, PT2) graphs with a free height and width,
checked through ONNX Runtime on other sizes than the traced one; the onnxruntime and openvino runners;
`benchmark`; and what does not apply (an input size, quantization, embeddings) refused clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.enums import Task
from visionzoo.errors import ExportError, InputError
from visionzoo.runtime.backends import Backend, installed_backends, open_runner
from visionzoo.runtime.export import ExportFormat, describe, export_model, load_torch_export, read_onnx_info

from .cli_runner import run_cli as run

pytest.importorskip("onnxruntime")
RUNTIMES = [b for b in (Backend.ONNXRUNTIME, Backend.OPENVINO) if b in installed_backends()]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def lite0_lraspp():
    """LR-ASPP on EfficientNet-Lite0: its TensorFlow-style padding depends on each input size."""
    torch.manual_seed(0)
    return visionzoo.create_model("lraspp", backbone="efficientnet_lite0", pretrained_backbone=True,
                                  num_classes=4).eval()


@pytest.fixture(scope="module")
def lite0_onnx(lite0_lraspp, tmp_path_factory):
    return export_model(lite0_lraspp, "onnx", tmp_path_factory.mktemp("onnx") / "lraspp.onnx")


def _ort_matches(path, net, shapes) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = torch.randn(*shape)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.inference_mode():
            ref = net(x)["out"].numpy()
        assert logits.shape == ref.shape == (shape[0], net.num_classes, *shape[2:])
        assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_export_has_a_free_height_and_width(lite0_lraspp, lite0_onnx):
    result = lite0_onnx
    assert set(result.max_rel_diff) == {"logits"} and result.worst <= 1e-4
    info = read_onnx_info(result.path)
    assert info.task is Task.SEGMENTATION and info.input_size is None and info.embedding_dim is None
    assert info.num_classes == 4 and info.preprocess.kind == "SemanticSegmentation"
    assert "N x 3 x height x width" in describe(result)
    import onnx

    record = json.loads({p.key: p.value for p in onnx.load(str(result.path)).metadata_props}["visionzoo"])
    assert record["task"] == "segmentation" and record["inputs"] == "images" and record["outputs"] == ["logits"]
    # sizes of every parity at every stride (the padding of the strided convolutions differs)
    _ort_matches(result.path, lite0_lraspp, [(1, 3, 64, 64), (2, 3, 97, 131), (1, 3, 250, 189)])


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_published_architectures_export_too(name, tmp_path):
    # freshly initialised (the parity fill makes scores in the thousands, beyond float32's 1e-4 of agreement)
    torch.manual_seed(0)
    net = visionzoo.create_model(name, weights=None).eval()
    result = export_model(net, "onnx", tmp_path / f"{name}.onnx")
    assert result.worst <= 1e-4, result.max_rel_diff
    _ort_matches(result.path, net, [(1, 3, 120, 72)])


def test_torchscript_round_trips_and_pt2_is_refused(lite0_lraspp, tmp_path):
    with pytest.raises(ExportError, match="takes a free height and width, which pt2 export does not support"):
        export_model(lite0_lraspp, "pt2", tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())
    result = export_model(lite0_lraspp, "torchscript", tmp_path / "m.torchscript")
    assert result.format is ExportFormat.TORCHSCRIPT and result.worst <= 1e-4
    module, info = load_torch_export(result.path, "torchscript")
    assert info.task is Task.SEGMENTATION
    x = torch.randn(2, 3, 90, 118)
    with torch.inference_mode():
        (logits,) = module(x)
        torch.testing.assert_close(logits, lite0_lraspp(x)["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", RUNTIMES, ids=lambda b: b.value)
def test_runtime_runners_take_any_size(lite0_lraspp, backend):
    runner = open_runner(lite0_lraspp, backend, threads=2)
    assert runner.task is Task.SEGMENTATION and runner.path.suffix == ".onnx"
    # 8 images on 2 threads: ONNX Runtime splits the batch; OpenVINO compiles each shape
    for shape in [(1, 3, 128, 160), (8, 3, 96, 80), (1, 3, 128, 160)]:
        x = torch.randn(*shape)
        (logits,) = runner(x)
        with torch.inference_mode():
            ref = lite0_lraspp(x)["out"]
        assert logits.shape == ref.shape and (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.equal(runner.logits(x), logits)
    with pytest.raises(InputError, match=r"takes \(N, 3, height, width\) batches"):
        runner(torch.zeros(1, 1, 64, 64))
    with pytest.raises(InputError, match="segmentation model: it has no embedding output"):
        runner.embeddings(torch.zeros(1, 3, 64, 64))


def test_the_torch_runner_returns_the_main_output(lite0_lraspp):
    runner = open_runner(lite0_lraspp, "torch")
    x = torch.randn(2, 3, 72, 88)
    (logits,) = runner(x)
    with torch.inference_mode():
        torch.testing.assert_close(logits, lite0_lraspp(x)["out"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.logits(x), logits)


def test_benchmark_times_photo_sized_inputs(capsys, lite0_onnx, tmp_path):
    report = tmp_path / "bench.json"
    code, out, err = run(capsys, "benchmark", lite0_onnx.path, "--backends", "onnxruntime", "--repeats", "1",
                         "--warmup", "0", "--threads", "1", "--json", report)
    assert code == 0, err
    result = json.loads(report.read_text())
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [("onnxruntime", 1), ("onnxruntime", 4)]
    assert all(r["throughput"] > 0 for r in result["rows"])
    code, out, err = run(capsys, "benchmark", lite0_onnx.path, "--data", tmp_path)
    assert code == 1 and "visionzoo evaluate" in err


def test_what_does_not_apply_is_refused(lite0_lraspp, tmp_path):
    with pytest.raises(InputError, match="takes inputs of any height and width; export it without input_size"):
        export_model(lite0_lraspp, "onnx", tmp_path / "x.onnx", input_size=224)
    with pytest.raises(InputError, match="quantize makes int8 classifiers"):
        visionzoo.quantize(lite0_lraspp, None, tmp_path / "x.int8.onnx", mode="dynamic")
    assert not list(tmp_path.iterdir())
