"""Model bundles: save, reload through create_model, use in predict; refusals and atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

import visionzoo
from visionzoo.bundle import BUNDLE_JSON, WEIGHTS_FILE, read_bundle, save_bundle
from visionzoo.errors import CheckpointError, InputError
from visionzoo.factory import load_bundle
from visionzoo.weights.records import Preprocess

from .cli_runner import run_cli as run
from .photos import sample_image

CLASSES = ["cat", "coffee", "rocket"]
PP = Preprocess(80, 64, "bilinear")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return visionzoo.create_model("resnet18", num_classes=len(CLASSES)).eval()


@pytest.fixture
def bundle(tmp_path, small_model):
    return save_bundle(small_model, tmp_path / "b", classes=CLASSES, preprocess=PP, metrics={"val_acc": 0.5},
                       training={"strategy": "full"}, history=[{"epoch": 1, "val_acc": 0.5}])


def test_round_trip_through_create_model(bundle, small_model):
    x = torch.randn(2, 3, 64, 64)
    for model in (visionzoo.create_model(bundle), visionzoo.create_model("resnet18", weights=bundle),
                  visionzoo.create_model(str(bundle), weights="DEFAULT"), load_bundle(bundle)):
        assert model.categories == tuple(CLASSES)
        assert model.preprocess == PP
        assert not model.training
        assert model.card.bundle.metrics == {"val_acc": 0.5}
        torch.testing.assert_close(model(x), small_model(x), rtol=0, atol=0)
    meta = json.loads((bundle / BUNDLE_JSON).read_text())
    assert meta["architecture"] == "resnet18" and meta["num_classes"] == 3 and meta["classes"] == CLASSES
    assert meta["visionzoo_version"] == visionzoo.__version__
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_run_folder_and_new_head(tmp_path, small_model):
    save_bundle(small_model, tmp_path / "run" / "bundle", classes=CLASSES, preprocess=PP)
    model = visionzoo.create_model(tmp_path / "run", num_classes=5)  # a finetune run folder works too
    assert model.num_classes == 5 and model.categories is None


def test_refusals(tmp_path, bundle, small_model):
    with pytest.raises(InputError, match="holds a resnet18, not a resnet34"):
        visionzoo.create_model("resnet34", weights=bundle)
    with pytest.raises(InputError, match="one name per output"):
        save_bundle(small_model, tmp_path / "c", classes=["a", "b"], preprocess=PP)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bundle"):
        save_bundle(small_model, tmp_path / "occupied", classes=CLASSES, preprocess=PP)
    with pytest.raises(InputError, match="not a bundle"):
        read_bundle(tmp_path)
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        visionzoo.create_model(bundle)


def test_replacing_a_bundle_is_atomic(tmp_path, small_model, monkeypatch):
    first = save_bundle(small_model, tmp_path / "b", classes=CLASSES, preprocess=PP, metrics={"v": 1})
    import visionzoo.bundle as B

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(B, "_swap_in", fail)
    with pytest.raises(OSError):
        save_bundle(small_model, tmp_path / "b", classes=CLASSES, preprocess=PP, metrics={"v": 2})
    assert read_bundle(first).metrics == {"v": 1}  # the old bundle is intact
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # and the half-written one is gone
    monkeypatch.undo()
    save_bundle(small_model, tmp_path / "b", classes=CLASSES, preprocess=PP, metrics={"v": 3})
    assert read_bundle(first).metrics == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_predict_accepts_a_bundle(bundle, capsys):
    results = visionzoo.predict([sample_image("coffee.png")], model=str(bundle), topk=2)
    assert results[0].top[0].label in CLASSES and len(results[0].top) == 2
    code, out, err = run(capsys, "predict", sample_image("coffee.png"), "--model", bundle, "--format", "json")
    assert code == 0, err
    assert json.loads(out)[0]["predictions"][0]["label"] in CLASSES
