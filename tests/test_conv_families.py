"""What the convolutional families need beyond the shared interface tests: published
checkpoints in their real shape (GoogLeNet's auxiliary heads, DenseNet's legacy names),
auxiliary classifiers for training, stochastic depth, and inputs of other sizes."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.models.regnet import VARIANTS as REGNETS
from visionzoo.models.regnet import stage_plan
from visionzoo.registry import REGISTRY
from visionzoo.weights.hub import cache_dir
from visionzoo.weights.remap import detect_layout

from .parity import fill_values, relative_error


def _filled_state_dict(keys) -> dict[str, torch.Tensor]:
    """A checkpoint with the parity fill for `[name, shape, ...]` rows (what `fill_` would set)."""
    sd = {}
    for name, shape, *_ in keys:
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros((), dtype=torch.long)
        else:
            sd[name] = torch.from_numpy(fill_values(name, tuple(shape), seed=0))
    return sd


def _reference_error(model: nn.Module, arch: str, parity_input, parity_outputs) -> float:
    with torch.no_grad():
        out = model.double()(torch.from_numpy(parity_input).double()).numpy()
    return relative_error(out, parity_outputs[arch])


def _same_logits(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _save(sd: dict[str, torch.Tensor], path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def _cached_stand_in(record, path):
    """The record for a stand-in file saved in the cache under the record's file name: the
    published hash prefix is replaced by the stand-in's (cached files are hash-verified)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return dataclasses.replace(record, sha256_prefix=digest[:len(record.sha256_prefix)])


# -- GoogLeNet: the published file carries aux1/aux2 -----------------------------------------------
def test_googlenet_checkpoint_with_aux_heads_loads_and_drops_them(tmp_path, parity_manifest, parity_input,
                                                                  parity_outputs, caplog):
    case = parity_manifest["googlenet"]
    assert any(k.startswith("aux1.") for k, _ in case["checkpoint_keys"])
    path = _save(_filled_state_dict(case["checkpoint_keys"]), tmp_path / "googlenet.pth")

    with caplog.at_level(logging.INFO, logger="visionzoo"):
        model = visionzoo.create_model("googlenet", weights=path, transform_input=True)
    assert model.aux1 is None and model.aux2 is None
    assert not any(k.startswith(("aux1.", "aux2.")) for k in model.state_dict())
    assert "dropped the auxiliary classifiers" in caplog.text
    assert _reference_error(model, "googlenet", parity_input, parity_outputs) <= 1e-6

    # through the weights record: its builder arguments (transform_input, no aux heads) apply
    record = visionzoo.get_weights("googlenet")
    cached = _save(_filled_state_dict(case["checkpoint_keys"]), cache_dir() / record.file_name)
    record = _cached_stand_in(record, cached)
    from_record = visionzoo.create_model("googlenet", weights=record)
    assert from_record.transform_input and from_record.aux1 is None
    assert _same_logits(from_record, model.float())

    # asked for, the auxiliary heads load from the same file
    with_aux = visionzoo.create_model("googlenet", weights=record, aux_logits=True)
    assert torch.equal(with_aux.aux2.fc1.weight, torch.from_numpy(fill_values("aux2.fc1.weight", (1024, 2048))))


# -- DenseNet: the published files use the pre-2018 names -----------------------------------------
def _legacy_densenet_file(keys, path):
    """A DenseNet checkpoint as torchvision published it: `norm.1` names, no BN counters."""
    sd = _filled_state_dict(keys)
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
              for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    return _save(legacy, path)


def test_densenet_legacy_checkpoint_loads_from_a_path_and_from_a_record(tmp_path, parity_manifest, parity_input,
                                                                       parity_outputs):
    keys = parity_manifest["densenet121"]["keys"]
    path = _legacy_densenet_file(keys, tmp_path / "legacy.pth")
    assert detect_layout(torch.load(path, weights_only=True)) == "densenet_legacy"

    from_path = visionzoo.create_model("densenet121", weights=path)
    assert from_path.categories is not None  # the published head size: the published classes
    assert _reference_error(from_path, "densenet121", parity_input, parity_outputs) <= 1e-6

    record = visionzoo.get_weights("densenet121")
    assert record.layout == "densenet_legacy"
    legacy = _cached_stand_in(record, _legacy_densenet_file(keys, cache_dir() / record.file_name))
    from_record = visionzoo.create_model("densenet121", weights=legacy)
    assert from_record.pretrained_weights is legacy
    from_path.float()
    assert _same_logits(from_record, from_path)

    # a file already in today's names still loads through the record's layout
    current = _cached_stand_in(record, _save(_filled_state_dict(keys), cache_dir() / record.file_name))
    assert _same_logits(visionzoo.create_model("densenet121", weights=current), from_path)


def test_densenet_memory_efficient_gives_the_same_gradients():
    from visionzoo.models.densenet import DenseNet, DenseNetConfig

    torch.manual_seed(0)
    tiny = DenseNetConfig(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
    plain = DenseNet(tiny, num_classes=3).train()
    efficient = DenseNet(tiny, num_classes=3, memory_efficient=True).train()
    efficient.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    for model in (plain, efficient):
        nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(plain.features.conv0.weight.grad, efficient.features.conv0.weight.grad, atol=1e-6)


# -- auxiliary classifiers ------------------------------------------------------------------------
@pytest.mark.parametrize("arch, size, n_aux", [("googlenet", 96, 2), ("inception_v3", 299, 1)])
def test_auxiliary_heads_for_training(arch, size, n_aux):
    torch.manual_seed(0)
    model = visionzoo.create_model(arch, num_classes=5, aux_logits=True).train()
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 4])
    assert model(x).shape == (2, 5)  # forward gives the main logits, in training too
    logits, aux = model.forward_with_aux(x)
    assert logits.shape == (2, 5) and len(aux) == n_aux and all(a.shape == (2, 5) for a in aux)
    if arch == "googlenet":  # the auxiliary losses reach the trunk
        loss = nn.functional.cross_entropy(logits, y) + 0.3 * sum(nn.functional.cross_entropy(a, y) for a in aux)
        loss.backward()
        assert model.aux1.fc2.weight.grad is not None and model.inception4a.branch1.conv.weight.grad is not None
    model.reset_classifier(3)  # every head predicts the new classes
    with torch.no_grad():
        logits, aux = model.forward_with_aux(x)
    assert logits.shape == (2, 3) and all(a.shape == (2, 3) for a in aux)

    with torch.device("meta"):
        without = REGISTRY.get_architecture(arch).build(num_classes=5, aux_logits=False)
    with pytest.raises(visionzoo.InputError, match="aux_logits=True"):
        without.forward_with_aux(x)


def test_inception_v3_keeps_its_auxiliary_head_with_the_published_weights():
    assert visionzoo.get_weights("inception_v3").builder_kwargs["aux_logits"] is True
    with torch.device("meta"):
        model = REGISTRY.get_architecture("inception_v3").build(aux_logits=True)
    assert "AuxLogits.fc.weight" in model.state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    without = REGISTRY.get_architecture("inception_v3").build(aux_logits=False, init_weights=False)
    without.load_state_dict(without.adapt_state_dict(sd))


# -- stochastic depth and architecture tables -------------------------------------------------------
@pytest.mark.parametrize("arch, last", [("convnext_tiny", 0.1), ("convnext_large", 0.5), ("efficientnet_b0", 0.2)])
def test_stochastic_depth_grows_linearly_to_the_last_block(arch, last):
    from visionzoo.models.layers import StochasticDepth

    with torch.device("meta"):
        model = REGISTRY.get_architecture(arch).build()
    probs = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert probs[0] == 0.0 and probs == sorted(probs) and probs[-1] == pytest.approx(last, abs=0.02)


def test_regnet_sizes_come_from_one_rule():
    plan = stage_plan(REGNETS["regnet_y_400mf"])
    assert [(s.width, s.depth) for s in plan] == [(48, 1), (104, 3), (208, 6), (440, 6)]
    assert len(REGNETS) == 15 and all(len(stage_plan(cfg)) == 4 for cfg in REGNETS.values())


# -- other input sizes ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, size", [
    ("densenet121", (193, 241)), ("googlenet", (97, 131)), ("inception_v3", (75, 75)),
    ("inception_v3", (331, 300)), ("mobilenet_v3_large", (193, 241)), ("mnasnet1_0", (193, 241)),
    ("shufflenet_v2_x1_0", (193, 241)), ("regnet_y_400mf", (193, 241)), ("convnext_tiny", (193, 241)),
    ("efficientnet_b0", (193, 241)),
])
def test_runs_on_other_input_sizes(arch, size):
    torch.manual_seed(0)
    model = visionzoo.create_model(arch)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
        logits = model.forward_head(feats)
    assert feats.shape[1] == model.num_features and logits.shape == (1, 1000)
    assert np.isfinite(logits.numpy()).all()
    # the last map follows the input's aspect ratio (about 1/32 of each side)
    h, w = feats.shape[-2:]
    assert abs(size[0] / h - size[1] / w) <= 0.25 * max(size[0] / h, size[1] / w)
