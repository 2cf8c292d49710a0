"""Safe and lean loading: no code runs from pickles, safetensors round trips, models built
without random init are bit-identical to normally built ones, and every adaptation is reported."""
from __future__ import annotations

import argparse
import logging
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.errors import CheckpointError
from visionzoo.models import ZooModel
from visionzoo.registry import REGISTRY
from visionzoo.weights import safetensors_file
from visionzoo.weights.adapt import LoadReport, adapt, adapt_input_channels, load_weights, plan_load, realize
from visionzoo.weights.io import checkpoint_format, read_checkpoint, save_state_dict
from visionzoo.weights.lean import meta_tensors

from .subset import per_family


def _identical(a: nn.Module, b: nn.Module) -> None:
    """Same parameters and buffers (persistent or not), values, dtypes and requires_grad."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].requires_grad == pb[k].requires_grad, k
        assert torch.equal(pa[k], pb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


# -- lean loading ------------------------------------------------------------------------------------
# every architecture but the heads composed on a backbone (their backbones are covered themselves)
BUILT = [a for a in visionzoo.list_models() if not REGISTRY.get_architecture(a).composed]


@pytest.mark.parametrize("arch", per_family(BUILT))
def test_lean_build_is_identical_to_the_normal_one(arch):
    """Every registered architecture: building on the meta device and assigning the checkpoint's
    tensors gives exactly the model that random init + load_state_dict gives."""
    torch.manual_seed(0)
    build = REGISTRY.get_architecture(arch).build
    reference = build().eval()
    sd = reference.state_dict()
    for k, v in sd.items():  # BatchNorm counters as a trained checkpoint has them
        if k.endswith("num_batches_tracked"):
            v.fill_(123)
    # a task without classes (optical flow) builds without the argument
    plan = plan_load(build, sd, kwargs={"num_classes": reference.num_classes} if reference.num_classes else {})
    model = realize(plan, strict=True, what=arch).eval()
    assert plan.report.lean and plan.report.fits and meta_tensors(model) == []
    _identical(model, reference)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v2"])
def test_lean_load_from_a_file_gives_bit_identical_outputs(tmp_path, arch, suffix):
    torch.manual_seed(0)
    reference = visionzoo.create_model(arch)
    path = save_state_dict(reference.state_dict(), tmp_path / f"w{suffix}")
    model = visionzoo.create_model(arch, weights=path)
    assert model.load_report.lean and model.load_report.loaded == len(reference.state_dict())
    # parameters are the file's tensors, aligned like PyTorch's own allocations
    assert all(t.data_ptr() % 64 == 0 for t in model.state_dict().values())
    naive = REGISTRY.get_architecture(arch).build()
    naive.load_state_dict(torch.load(path, weights_only=True) if suffix == ".pth"
                          else read_checkpoint(path).state_dict)
    _identical(model, naive)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), naive.eval()(x))
    if arch == "resnet18":  # training works on the memory-mapped parameters, and leaves the file alone
        before = path.read_bytes()
        model.train()
        model(x).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        assert path.read_bytes() == before
        assert not torch.equal(model.conv1.weight, naive.conv1.weight)


def test_fp16_checkpoint_is_converted_like_the_normal_path(tmp_path):
    torch.manual_seed(0)
    reference = visionzoo.create_model("resnet18")
    path = save_state_dict({k: v.half() if v.is_floating_point() else v
                            for k, v in reference.state_dict().items()}, tmp_path / "half.safetensors")
    model = visionzoo.create_model("resnet18", weights=path)
    naive = REGISTRY.get_architecture("resnet18").build()
    naive.load_state_dict(read_checkpoint(path).state_dict)
    assert model.load_report.lean and model.conv1.weight.dtype == torch.float32
    _identical(model, naive)


# -- safetensors ---------------------------------------------------------------------------------------
def test_safetensors_files_interoperate_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"w": torch.randn(8, 3, 3, 3), "b": torch.randn(1000), "h": torch.randn(5, 7).half(),
               "bf": torch.randn(3).bfloat16(), "n": torch.tensor(3), "flag": torch.tensor([True, False]),
               "empty": torch.empty(0, 4)}
    ours = save_state_dict(tensors, tmp_path / "ours.safetensors", metadata={"arch": "test"})
    theirs = load_file(str(ours))
    assert all(torch.equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    for path in (ours, tmp_path / "lib.safetensors"):
        back, _ = safetensors_file.read(path)
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
        assert all(t.data_ptr() % 64 == 0 for t in back.values() if t.numel())
    assert safetensors_file.read(ours)[1] == {"arch": "test"}
    assert checkpoint_format(ours) == "safetensors"


def test_saving_views_of_one_storage(tmp_path):
    base = torch.arange(10.0)
    path = save_state_dict({"a": base[:4], "b": base[4:]}, tmp_path / "views.safetensors")
    back = read_checkpoint(path).state_dict
    assert torch.equal(back["a"], base[:4]) and torch.equal(back["b"], base[4:])


def test_a_corrupt_safetensors_header_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((100).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}')
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        visionzoo.create_model("resnet18", weights=path)


# -- pickles that would run code --------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch zip", "torch legacy pickle", "raw pickle", "inside a wrapper"])
def test_pickles_that_would_run_code_are_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"conv1.weight": torch.zeros(1), "evil": _Evil(marker)}
    if how == "torch zip":
        torch.save(state, path)
    elif how == "torch legacy pickle":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif how == "raw pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "hparams": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="would run code"):
        visionzoo.create_model("resnet18", weights=path)
    assert not marker.exists()


def test_timm_training_checkpoint_with_argparse_namespace_loads(tmp_path):
    torch.manual_seed(0)
    source = visionzoo.create_model("resnet18")
    path = tmp_path / "checkpoint-10.pth.tar"
    torch.save({"epoch": 10, "arch": "resnet18", "args": argparse.Namespace(lr=0.1, model="resnet18"),
                "state_dict": source.state_dict(), "optimizer": {"lr": 0.1}}, path)
    model = visionzoo.create_model("resnet18", weights=path)
    assert "unwrapped the 'state_dict' entry" in model.load_report.remapped
    _identical(model, source)


# -- adaptation and reports ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    model = visionzoo.create_model("resnet18")
    path = save_state_dict(model.state_dict(), tmp_path_factory.mktemp("w") / "r18.pth")
    return path, model


def test_new_head_for_num_classes_is_reported(resnet18_file):
    path, source = resnet18_file
    model = visionzoo.create_model("resnet18", weights=path, num_classes=7)
    report = model.load_report
    assert model.num_classes == 7 and model.fc.out_features == 7 and not model.fc.weight.is_meta
    assert any("replaced the 1000-class classifier (fc) with a new 7-class one" in s for s in report.adapted)
    assert report.new == ["fc.weight", "fc.bias"] and set(report.not_loaded) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


@pytest.mark.parametrize("in_chans", [1, 2, 5])
def test_first_convolution_adapted_for_other_input_channels(resnet18_file, in_chans):
    path, source = resnet18_file
    model = visionzoo.create_model("resnet18", weights=path, in_chans=in_chans)
    w, rgb = model.conv1.weight, source.conv1.weight
    assert w.shape == (64, in_chans, 7, 7)
    if in_chans == 1:
        assert torch.allclose(w, rgb.sum(1, keepdim=True))
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad():  # a grey image gives what its RGB copy gave
            assert torch.allclose(model(x), source(x.expand(1, 3, 64, 64)), atol=1e-5)
    else:
        expected = torch.cat([rgb] * math.ceil(in_chans / 3), 1)[:, :in_chans] * (3 / in_chans)
        assert torch.allclose(w, expected)
    assert any(f"conv1.weight: 3 -> {in_chans} input channels" in s for s in model.load_report.adapted)
    assert model.load_report.lean


def test_a_local_file_keeps_its_own_input_channels(tmp_path):
    torch.manual_seed(0)
    gray = visionzoo.create_model("resnet18", in_chans=1, num_classes=4)
    path = save_state_dict(gray.state_dict(), tmp_path / "gray.safetensors")
    model = visionzoo.create_model("resnet18", weights=path)
    assert model.conv1.in_channels == 1 and model.num_classes == 4
    assert "in_chans=1 taken from the checkpoint" in model.load_report.adapted
    _identical(model, gray)


def test_adapt_input_channels_keeps_dtype():
    w = torch.randn(4, 3, 3, 3).half()
    assert adapt_input_channels(w, 1).dtype == torch.float16
    assert adapt_input_channels(w, 4).shape == (4, 4, 3, 3)


def test_partial_load_lists_and_logs_what_was_not_loaded(resnet18_file, caplog):
    path, source = resnet18_file
    sd = read_checkpoint(path).state_dict
    partial = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    partial["layer4.0.conv2.weight"] = torch.zeros(512, 512, 1, 1)  # from a variant of the block
    partial["extra.weight"] = torch.zeros(3)
    partial_path = save_state_dict(partial, path.parent / "partial.pth")
    with pytest.raises(CheckpointError, match="missing .* unexpected .* shape mismatches|strict=False"):
        visionzoo.create_model("resnet34", weights=partial_path)
    with caplog.at_level(logging.WARNING, logger="visionzoo"):
        model = visionzoo.create_model("resnet18", weights=partial_path, strict=False)
    report = model.load_report
    assert sorted(report.missing) == sorted(k for k in sd if k.startswith("layer4.1.")
                                            and not k.endswith("num_batches_tracked"))
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == ["layer4.0.conv2.weight: checkpoint (512, 512, 1, 1) vs model (512, 512, 3, 3)"]
    assert "layer4.0.conv2.weight" in report.not_loaded and "layer4.1.conv1.weight" in report.not_loaded
    assert "not all of it loaded" in caplog.text and "extra.weight" in caplog.text
    assert not report.lean and meta_tensors(model) == []  # built normally: missing ones initialised
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert not torch.equal(model.layer4[1].conv1.weight, source.layer4[1].conv1.weight)


def test_load_weights_into_an_existing_model_returns_the_report(resnet18_file):
    path, source = resnet18_file
    model = REGISTRY.get_architecture("resnet18").build(num_classes=10)
    report = load_weights(model, path, strict=False)
    assert report.mismatched == ["fc.weight: checkpoint (1000, 512) vs model (10, 512)",
                                 "fc.bias: checkpoint (1000,) vs model (10,)"]
    assert model.load_report is report and report.loaded == len(source.state_dict()) - 2
    with pytest.raises(CheckpointError, match="strict=False"):
        load_weights(model, path)
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    report = load_weights(REGISTRY.get_architecture("resnet18").build(), wrapped)
    assert report.fits and report.remapped == ["stripped the 'module.' prefix from every key"]


class _Resampling(ZooModel):
    """A toy family whose `adapt_state_dict` changes a tensor's shape, as ViT's resampling does."""

    classifier_name = "fc"
    first_conv = "conv"

    def __init__(self, num_classes: int = 2, tokens: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pos = nn.Parameter(torch.zeros(1, tokens, 4))
        self.fc = nn.Linear(4, num_classes)
        self.num_classes, self.num_features = num_classes, 4

    def adapt_state_dict(self, state_dict):
        pos = state_dict["pos"]
        if pos.shape != self.pos.shape:  # shapes only: parameters may be on the meta device
            state_dict = dict(state_dict, pos=torch.nn.functional.interpolate(
                pos.transpose(1, 2), size=self.pos.shape[1], mode="linear").transpose(1, 2))
        return state_dict


def test_family_adaptations_are_reported_and_loaded_lean():
    source = _Resampling(tokens=5)
    plan = plan_load(lambda **kw: _Resampling(**kw), source.state_dict(), kwargs={"num_classes": 2, "tokens": 9})
    model = realize(plan)
    assert plan.report.adapted == ["pos: (1, 5, 4) -> (1, 9, 4) by _Resampling.adapt_state_dict"]
    assert plan.report.lean and model.pos.shape == (1, 9, 4) and meta_tensors(model) == []


def test_report_renders_and_serialises():
    report = LoadReport(source="x.pth", missing=[f"k{i}" for i in range(30)])
    assert not report.fits and "30 missing (k0, k1, k2, ...)" == report.problems()
    assert report.lines(limit=10)[-2] == "missing (left as initialised): ... and 20 more"
    assert report.to_dict()["fits"] is False
    adapt({}, visionzoo.create_model("squeezenet1_1"), report)  # no crash on an empty checkpoint


def test_load_weights_into_a_plain_torch_module(resnet18_file):
    path, source = resnet18_file
    plain = nn.Sequential()
    plain.add_module("conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=False))
    report = load_weights(plain, path, strict=False)
    assert report.loaded == 1 and len(report.unexpected) == len(source.state_dict()) - 1
    assert torch.equal(plain.conv1.weight, source.conv1.weight)
