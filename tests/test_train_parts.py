"""The pieces of fine-tuning, each on its own: split, data order, augmentation, stage map,
freezing, learning-rate groups and schedule, configuration checks, the strategy probe."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import visionzoo
from visionzoo.errors import InputError
from visionzoo.train.config import FinetuneConfig, Strategy
from visionzoo.train.data import Augment, EpochSampler, ShardKeys, stratified_split, training_preprocess
from visionzoo.train.distributed import Dist
from visionzoo.train.loop import lr_schedule
from visionzoo.train.stages import freeze, map_stages, param_groups, set_train_mode
from visionzoo.weights.records import Preprocess


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    targets = [0] * 40 + [1] * 20 + [2] * 3
    train, val = stratified_split(targets, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(targets)))
    counts = np.bincount(np.asarray(targets)[val])
    assert counts.tolist() == [10, 5, 1]
    assert stratified_split(targets, 0.25, seed=0) == (train, val)
    assert stratified_split(targets, 0.25, seed=1) != (train, val)


def test_epoch_order_and_augmentation_depend_on_seed_and_epoch_only():
    one = EpochSampler(50, Dist(), seed=3)
    one.set_epoch(2)
    keys = list(one)
    other = EpochSampler(50, Dist(), seed=3)
    other.set_epoch(0)
    list(other)  # whatever happened before
    other.set_epoch(2)
    assert list(other) == keys
    other.set_epoch(1)
    assert list(other) != keys
    # two processes: disjoint halves of the same permutation, equally long
    a, b = (EpochSampler(51, Dist(rank=r, world=2), seed=3) for r in (0, 1))
    a.set_epoch(2), b.set_epoch(2)
    ia, ib = [i for i, _ in a], [i for i, _ in b]
    assert len(ia) == len(ib) == 26 and set(ia) | set(ib) == set(range(51))
    assert [i for i, _ in ShardKeys(5, Dist(rank=1, world=2), None)] == [1, 3]

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    aug = Augment(Preprocess(36, 32), scale=(0.3, 1.0), hflip=True)
    x1 = aug(img, torch.Generator().manual_seed(keys[0][1]))
    x2 = aug(img, torch.Generator().manual_seed(keys[0][1]))
    x3 = aug(img, torch.Generator().manual_seed(keys[1][1]))
    assert x1.shape == (3, 32, 32)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_training_preprocess_scales_the_weights_recipe():
    base = Preprocess(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert training_preprocess(base, None) is base
    assert training_preprocess(base, 48) == Preprocess(55, 48, "bicubic", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "vgg11_bn"])
def test_stage_map_follows_the_forward_pass(name):
    model = visionzoo.create_model(name, num_classes=4)
    stages = map_stages(model, 64)
    n = len(model.feature_info)
    assert stages.num_stages == n
    everything = [p for names in stages.params for p in names] + list(stages.unused)
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())
    head = set(stages.params[n])
    assert {f"{model.classifier_name}.weight", f"{model.classifier_name}.bias"} <= head
    first = f"{model.first_conv}.weight"
    assert first in stages.params[0]
    # each stage's boundary module belongs to that stage
    for k, info in enumerate(model.feature_info):
        assert info.module in stages.modules[k]


def test_partial_freezing_keeps_batchnorm_statistics_and_modes():
    model = visionzoo.create_model("efficientnet_lite0", num_classes=3)
    stages = map_stages(model, 64)
    n = stages.num_stages
    trainable = {n - 1, n}
    frozen = freeze(model, stages, trainable)
    set_train_mode(model, frozen)
    stage_of = stages.param_stage()
    for name, p in model.named_parameters():
        assert p.requires_grad == (stage_of[name] in trainable), name
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen_bns = [name for name in bns if name in frozen]
    live_bns = [name for name in bns if name not in frozen]
    assert frozen_bns and live_bns
    assert all(not bns[name].training for name in frozen_bns) and all(bns[name].training for name in live_bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 64, 64))
    after = model.state_dict()
    for name in frozen_bns:
        assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])
    assert any(not torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"]) for name in live_bns)


def test_discriminative_learning_rates():
    model = visionzoo.create_model("resnet18", num_classes=3)
    stages = map_stages(model, 64)
    n = stages.num_stages
    groups = param_groups(model, stages, lr=1e-3, lr_decay=0.5, weight_decay=0.01, trainable=set(range(n + 1)))
    by_stage = {g["stage"]: g["lr"] for g in groups}
    assert by_stage[n] == 1e-3 and by_stage[0] == pytest.approx(1e-3 * 0.5 ** n)
    assert all(by_stage[k] < by_stage[k + 1] for k in range(n))
    assert all(g["weight_decay"] == 0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_warmup_then_cosine_schedule():
    f = lr_schedule(total_steps=100, warmup_steps=10, constant_steps=20)
    assert [f(s) for s in (0, 19)] == [1.0, 1.0]  # head warm-up: constant
    assert f(20) < f(25) < f(29) <= 1.0  # warm-up
    assert f(30) == pytest.approx(1.0) and f(65) == pytest.approx(0.5 * (1 + math.cos(math.pi * 35 / 70)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_config_validation():
    with pytest.raises(InputError, match="unknown strategy .everything.; use one of: linear, partial, full, auto"):
        FinetuneConfig(strategy="everything")
    with pytest.raises(InputError, match="val_fraction"):
        FinetuneConfig(val_fraction=1.5)
    with pytest.raises(InputError, match="head_epochs"):
        FinetuneConfig(epochs=2, head_epochs=2).resolved(Strategy.FULL)
    cfg = FinetuneConfig().resolved(Strategy.LINEAR)
    assert cfg.epochs == 30 and cfg.warmup_epochs == 0 and cfg.lr == 3e-3
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
