"""Structured pruning: channels really removed, the pruned bundle reloads from data, and
fine-tuning recovers the accuracy."""
from __future__ import annotations

import json

import pytest
import torch

import visionzoo
from visionzoo.bundle import read_bundle
from visionzoo.errors import InputError
from visionzoo.tasks.prune import count_macs, prune, prune_model

pytest.importorskip("torch_pruning")


def test_pruning_removes_whole_channels_and_keeps_the_interface():
    torch.manual_seed(0)
    net = visionzoo.create_model("resnet18", weights=None, num_classes=5).eval()
    macs, params = count_macs(net, 64)
    pruned = prune_model(net, 0.3, 64)
    new_macs, new_params = count_macs(pruned, 64)
    assert new_macs < 0.75 * macs and new_params < 0.75 * params
    assert pruned.num_classes == 5 and pruned.fc.out_features == 5
    assert pruned.num_features == pruned.fc.in_features < 512 and pruned.num_features % 8 == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = pruned.forward_features(x)
        assert features.shape[1] == pruned.num_features
        assert pruned.forward_head(features, pre_logits=True).shape == (2, pruned.num_features)
    maps = visionzoo.create_model("resnet18", weights=None, features_only=True)  # unpruned reference
    assert [i.num_chs for i in pruned.feature_info][-1] == pruned.num_features
    assert [i.num_chs for i in pruned.feature_info] != [i.num_chs for i in maps.feature_info]


@pytest.mark.slow  # 10 fine-tuning epochs: an accuracy figure (38 s quiet)
def test_prune_and_finetune_the_digits_bundle(digits_bundle, digits_dir, tmp_path):
    """The mechanics, cheaply: channels go, the interface stays, fine-tuning starts from the pruned
    network and improves it. How far 10 epochs recover the accuracy is a figure of
    benchmarks/deploy_accuracy.py, not of this test."""
    result = prune(digits_bundle, 0.3, out=tmp_path / "pruned", finetune_epochs=2, progress=False)
    print("\n".join(result.lines()))
    before, after = result.before, result.after
    assert after.macs <= 0.75 * before.macs
    assert after.params < before.params
    assert after.accuracy > result.after_pruning_accuracy + 0.2  # from chance level back to a classifier
    # the result is a bundle like any other: recorded structure, no pickled code
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["structure"]["modules"] and meta["format_version"] == 2
    info = read_bundle(result.bundle)
    assert info.classes == read_bundle(digits_bundle).classes
    net = visionzoo.create_model(result.bundle)
    assert sum(p.numel() for p in net.parameters()) == after.params
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["after"]["macs"] == after.macs and report["ratio"] == 0.3
    # every workflow takes it: predict, embed (with its smaller embedding), the runtimes
    digit = sorted((digits_dir / "3").glob("*.png"))[0]
    emb = visionzoo.embed([digit], model=result.bundle)
    assert emb.vectors.shape == (1, net.head_hidden_size)
    onnx_logits = visionzoo.predict([digit], model=result.bundle, backend="onnxruntime", topk=1)
    torch_logits = visionzoo.predict([digit], model=result.bundle, backend="torch", topk=1)
    assert onnx_logits[0].label == torch_logits[0].label


def test_prune_refuses_what_it_cannot_do(tmp_path, digits_bundle):
    with pytest.raises(InputError, match="is not a bundle"):
        prune("efficientnet_lite0", 0.3, out=tmp_path / "x")
    with pytest.raises(InputError, match="ratio must be between 0 and 1"):
        prune(digits_bundle, 1.5, out=tmp_path / "y", finetune_epochs=0)
    with pytest.raises(InputError, match="finetune_epochs must be >= 0"):
        prune(digits_bundle, 0.3, out=tmp_path / "z", finetune_epochs=-1)


@pytest.mark.slow  # evaluates the digits bundle before and after: 35 s on a busy machine
def test_an_accuracy_that_did_not_recover_is_warned_about(digits_bundle, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="visionzoo"):
        result = prune(digits_bundle, 0.3, out=tmp_path / "unrecovered", finetune_epochs=0, progress=False)
    assert result.after.accuracy < result.before.accuracy - 0.01  # pruned, not fine-tuned
    assert any("less accurate than the original" in r.getMessage() and "--finetune-epochs" in r.getMessage()
               for r in caplog.records)
