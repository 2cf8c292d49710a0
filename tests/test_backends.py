"""Inference backends: the torch backend's folding and channels-last, ONNX Runtime and OpenVINO
runners against plain PyTorch, the export cache."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.errors import InputError
from visionzoo.runtime.backends import Backend, installed_backends, open_runner
from visionzoo.runtime.cache import exported_onnx
from visionzoo.runtime.torch_opt import optimize_for_inference

RUNTIMES = [b for b in (Backend.ONNXRUNTIME, Backend.OPENVINO) if b in installed_backends()]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small",
                                  *(pytest.param(a, marks=pytest.mark.slow)  # 19-32 s each on a loaded machine
                                    for a in ("densenet121", "convnext_tiny", "swin_t"))])
def test_folding_batchnorms_keeps_the_function(arch):
    torch.manual_seed(0)
    net = visionzoo.create_model(arch, weights=None).eval()
    # non-trivial statistics, so that folding has something to get wrong
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    fast = optimize_for_inference(net)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    if arch in ("resnet18", "efficientnet_lite0", "mobilenet_v3_small"):  # every BatchNorm follows a conv
        assert before > 0 and left == 0
    elif arch == "densenet121":  # pre-activation: only the norms after the 1x1 convolutions fold
        assert 0 < left < before
    # the caller's model is untouched
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == before
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref = net(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_torch_runner_matches_the_model_and_keeps_its_interface():
    net = visionzoo.create_model("efficientnet_lite0", pretrained=True).eval()
    runner = open_runner(net, "torch")
    assert runner.backend is Backend.TORCH and runner.net is not net
    x = torch.randn(3, 3, 224, 224)
    logits, embedding = runner(x)
    with torch.inference_mode():
        torch.testing.assert_close(logits, net(x), rtol=1e-4, atol=1e-4)
        ref_embedding = net.forward_head(net.forward_features(x), pre_logits=True)
    torch.testing.assert_close(embedding, ref_embedding, rtol=1e-4, atol=1e-4)
    assert runner.categories[967] == "espresso" and runner.num_classes == 1000


@pytest.mark.parametrize("backend", RUNTIMES, ids=lambda b: b.value)
def test_runtime_runners_match_pytorch_on_any_batch_size(backend):
    net = visionzoo.create_model("efficientnet_lite0", pretrained=True).eval()
    runner = open_runner(net, backend)
    assert runner.backend is backend and runner.path.suffix == ".onnx"
    # OpenVINO compiles per shape (the second 1 reuses the first); ONNX Runtime splits a batch of
    # 4+ images per thread across single-threaded runs (9: unequal parts)
    for batch in (1, 4, 9, 1):
        x = torch.randn(batch, 3, 224, 224)
        logits, embedding = runner(x)
        with torch.inference_mode():
            ref = net(x)
        assert logits.shape == (batch, 1000) and embedding.shape == (batch, 1280)
        assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(InputError, match=r"takes \(N, 3, 224, 224\) batches"):
        runner(torch.zeros(1, 3, 200, 200))


@pytest.mark.slow  # two exports: 50 s on a loaded machine
def test_the_export_is_cached_and_keyed_on_the_weights(caplog):
    net = visionzoo.create_model("mobilenet_v3_small", weights=None, num_classes=3).eval()
    first = exported_onnx(net)
    mtime = first.stat().st_mtime_ns
    assert exported_onnx(net) == first and first.stat().st_mtime_ns == mtime  # reused, not re-exported
    with torch.no_grad():
        net.classifier[-1].bias.add_(1.0)  # a changed model must not reuse the old graph
    second = exported_onnx(net)
    assert second != first and second.is_file()


def test_bad_backend_choices_are_refused():
    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        open_runner("efficientnet_lite0", "tensorrt")
    with pytest.raises(InputError, match="bf16 runs on the torch and openvino backends"):
        open_runner("efficientnet_lite0", "onnxruntime", precision="bf16")
    with pytest.raises(InputError, match="runs on the CPU"):
        open_runner("efficientnet_lite0", "onnxruntime", device="cuda")
