"""The compatibility doctor and automatic remapping: torchvision, wrapped, packaged and timm
checkpoints are identified, and timm layouts load and reproduce timm's float64 logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.tasks.inspect import inspect_checkpoint
from visionzoo.weights.hub import packaged_file
from visionzoo.weights.io import save_state_dict
from visionzoo.weights.remap import LAYOUTS, detect_layout, remap, strip_prefixes

from .parity import PARITY, fill_values, relative_error

TIMM = json.loads((PARITY / "timm" / "manifest.json").read_text())["cases"]
TORCHVISION = json.loads((PARITY / "manifest.json").read_text())["cases"]
TOL = 1e-6


@pytest.fixture(scope="module")
def resnet50_state_dict():
    torch.manual_seed(0)
    return visionzoo.create_model("resnet50").state_dict()


def test_torchvision_resnet50(tmp_path, resnet50_state_dict):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50_state_dict, path)
    report = inspect_checkpoint(path)
    assert report.architecture == "resnet50" and report.candidates[0].score == 1.0
    assert report.format == "torch zip" and report.layout == "native"
    assert report.num_tensors == len(resnet50_state_dict) == 320
    assert report.dtypes == {"float32": 267, "int64": 53}
    assert report.num_values == sum(t.numel() for t in resnet50_state_dict.values())
    assert report.wrapper == [] and report.prefixes == []


def test_wrapped_ddp_checkpoint(tmp_path, resnet50_state_dict):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in resnet50_state_dict.items()}}, path)
    report = inspect_checkpoint(path, model="resnet50")
    assert report.architecture == "resnet50"
    assert report.wrapper == ["state_dict"] and report.prefixes == ["module."]
    assert report.fit.fits and report.fit.remapped == ["unwrapped the 'state_dict' entry",
                                                       "stripped the 'module.' prefix from every key"]
    text = str(report)
    assert "unwrapped 'state_dict'; stripped 'module.'" in text and "resnet50: fits" in text
    model = visionzoo.create_model("resnet50", weights=path)  # loads as the doctor said
    assert model.load_report.remapped == report.fit.remapped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in resnet50_state_dict.items())


def test_model_prefix_and_compile_prefix(resnet50_state_dict):
    sd = {"model._orig_mod." + k: v for k, v in resnet50_state_dict.items()}
    stripped, removed = strip_prefixes(sd)
    assert removed == ["model.", "_orig_mod."] and stripped.keys() == resnet50_state_dict.keys()
    # a model whose own keys start with the prefix keeps it
    assert strip_prefixes({"model.x": torch.zeros(1)}, ["model.x"])[1] == []


def test_packaged_efficientnet_lite0():
    path = packaged_file(visionzoo.get_weights("efficientnet_lite0"))
    report = inspect_checkpoint(path, model="efficientnet_lite0.IMAGENET1K_V1")
    assert report.architecture == "efficientnet_lite0"
    assert report.layout == "efficientnet_pytorch" and report.format == "torch legacy pickle"
    assert report.fit.fits and "efficientnet_pytorch" in report.fit.remapped[0]


def test_against_the_wrong_model_lists_the_differences(tmp_path, resnet50_state_dict):
    path = save_state_dict(resnet50_state_dict, tmp_path / "r50.safetensors")
    report = inspect_checkpoint(path, model="resnet34")
    assert report.format == "safetensors" and report.architecture == "resnet50"
    fit = report.fit
    assert not fit.fits and fit.unexpected and fit.mismatched
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in fit.mismatched
    assert "does not fit" in str(report)


def test_unknown_checkpoint(tmp_path):
    path = save_state_dict({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)},
                           tmp_path / "other.pth")
    report = inspect_checkpoint(path)
    assert report.architecture is None
    assert "architecture  unknown" in str(report)


# -- timm layouts ---------------------------------------------------------------------------------
def _timm_state_dict(case: str) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(fill_values(name, tuple(shape), 0))
            for name, shape, _dtype, kind in TIMM[case]["keys"] if kind == "filled"}


@pytest.mark.parametrize("case", list(TIMM))
def test_timm_converter_gives_the_torchvision_keys_and_shapes(case):
    """Checked against the reference key list, so it holds before the architecture is merged."""
    arch = TIMM[case]["architecture"]
    sd = {k: torch.empty(s, device="meta") for k, s, _, kind in TIMM[case]["keys"] if kind == "filled"}
    target = {k: tuple(s) for k, s, _, _ in TORCHVISION[arch]["keys"]} if arch in TORCHVISION else None
    if target is None:  # efficientnet_lite0: not a torchvision model, our build is the reference
        from visionzoo.weights.lean import build_meta

        target = {k: tuple(v.shape) for k, v in
                  build_meta(visionzoo.REGISTRY.get_architecture(arch).build).state_dict().items()}
    layout = detect_layout(sd)
    assert layout == ("native" if case == "resnet50" else LAYOUTS[layout].name)
    converted = {k: tuple(v.shape) for k, v in remap(sd, list(target), layout).items()}
    expected = {k: s for k, s in target.items() if not k.endswith("num_batches_tracked")}
    assert converted == expected


@pytest.mark.parametrize("case", list(TIMM))
def test_timm_checkpoint_is_identified_and_reproduces_timm_logits(case, tmp_path, parity_input):
    arch = TIMM[case]["architecture"]
    if arch not in visionzoo.list_models():
        pytest.skip(f"{arch} is not registered on this branch yet (it comes with its family's branch)")
    path = save_state_dict(_timm_state_dict(case), tmp_path / f"{case}.safetensors")
    report = inspect_checkpoint(path, model=arch)
    assert report.architecture == arch, report.candidates
    assert report.fit.fits, report.fit.problems()
    model = visionzoo.create_model(arch, weights=path).double()
    assert model.load_report.lean
    with torch.no_grad():
        out = model(torch.from_numpy(parity_input).double()).numpy()
    ref = np.load(PARITY / "timm" / "outputs.npz")[case]
    assert relative_error(out, ref) <= TOL


def test_inspect_refuses_a_pickle_that_would_run_code(tmp_path):
    from visionzoo.errors import CheckpointError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "hparams": Evil()}, path)
    with pytest.raises(CheckpointError, match="would run code"):
        inspect_checkpoint(path)
    assert not marker.exists()
