"""Fine-tuning end to end on scikit-learn's digits: the strategies' accuracy, the frozen
backbone of `linear`, `auto`'s explanation, exact resume after SIGKILL, torchrun with two
processes, evaluation, and the errors.

Everything runs on one intra-op thread (restored afterwards): CPU CI machines are shared,
and two threads per process on a busy two-core machine made training 10x slower here.
Sizes are chosen for CPU time: 48x48 crops for the linear probe (its features need them),
32x32 for full fine-tuning, 200-image subsets where only the mechanics are tested.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visionzoo
from visionzoo import cli
from visionzoo.errors import InputError, TrainingError
from visionzoo.tasks.prune import bundle_split
from visionzoo.train.config import Strategy

from .cli_runner import run_cli as run
from .killing import kill_in_epoch_2, subprocess_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def linear_run(digits_linear_run):
    """The session's linear run on the digits (conftest), which counts the backbone's images."""
    return digits_linear_run


def test_linear_reaches_94_percent_running_the_backbone_once_per_image_and_pass(linear_run):
    result, images = linear_run
    assert result.strategy is Strategy.LINEAR
    n_train, n_val = 1347, 450  # 25% of each class held out
    assert (result.history[0]["epoch"], len(result.history)) == (1, 30)
    assert images == 2 * n_train + n_val  # a clean and an augmented pass, then validation: once each
    assert result.metrics["val_acc"] >= 0.94, result.metrics


def test_linear_leaves_the_backbone_and_its_batchnorm_statistics_untouched(linear_run):
    result, _ = linear_run
    trained = load_file(result.bundle / "model.safetensors")
    pretrained = visionzoo.create_model("efficientnet_lite0", pretrained=True).state_dict()
    head = "classifier.1."
    assert any("running_mean" in k for k in trained)
    for key, value in pretrained.items():
        if not key.startswith(head):
            assert torch.equal(trained[key], value), key
    assert trained[head + "weight"].shape == (10, 1280)


def test_the_bundle_describes_itself(linear_run):
    result, _ = linear_run
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["architecture"] == "efficientnet_lite0" and meta["classes"] == [str(d) for d in range(10)]
    assert meta["preprocess"]["crop_size"] == 48 and meta["preprocess"]["resize_size"] == 55
    assert meta["training"]["strategy"] == "linear" and meta["training"]["image_size"] == 48
    assert meta["base_weights"] == "efficientnet_lite0.IMAGENET1K_V1"
    assert len(meta["history"]) == 30 and meta["metrics"]["val_acc"] == result.metrics["val_acc"]
    model = visionzoo.create_model(result.run_dir)
    assert model.categories == tuple(str(d) for d in range(10)) and model.preprocess.crop_size == 48


def held_out_csv(bundle, path):
    """The bundle's validation images (never trained on) as a path,label CSV."""
    _, val_samples, classes = bundle_split(bundle)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((str(p), classes[y]) for p, y in val_samples)
    return path, len(val_samples)


def test_evaluate_scores_held_out_images_and_writes_metrics_and_plots(linear_run, tmp_path, capsys):
    result, _ = linear_run
    data, n = held_out_csv(result.bundle, tmp_path / "val.csv")
    ev = visionzoo.evaluate(result.bundle, data, out=tmp_path / "eval")
    assert ev.num_images == n and n >= 400  # a quarter of the 1797 digits
    # the validation accuracy recorded in training, measured again by evaluate on the same images
    assert ev.accuracy == pytest.approx(result.metrics["val_acc"], abs=0.005)
    assert ev.accuracy >= 0.9 and ev.top5 >= ev.accuracy
    assert sum(map(sum, ev.confusion)) == n
    assert ev.accuracy == pytest.approx(sum(ev.confusion[i][i] for i in range(10)) / n)
    assert [c.support for c in ev.per_class] == [sum(row) for row in ev.confusion]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["accuracy"] == ev.accuracy and len(saved["per_class"]) == 10
    for name in ("confusion_matrix.png", "training_curves.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run(capsys, "evaluate", result.run_dir, data, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == ev.accuracy


def test_per_class_metrics_match_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    from visionzoo.metrics import per_class

    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    p = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
    confusion = [[sum(1 for a, b in zip(y, p, strict=True) if (a, b) == (i, j)) for j in range(4)] for i in range(4)]
    ours = per_class(torch.tensor(confusion).numpy(), "abcd")
    ref = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    for i, m in enumerate(ours):
        assert (m.precision, m.recall, m.f1, m.support) == pytest.approx([r[i] for r in ref])


@pytest.mark.slow  # an accuracy figure: 5 epochs over 1,797 digits (1.5-6.5 min on 2 cores)
def test_full_reaches_97_5_percent_in_5_epochs(digits_dir, tmp_path):
    started = time.perf_counter()
    result = visionzoo.finetune(digits_dir, tmp_path / "full", strategy="full", epochs=5, image_size=48,
                                lr=2e-3, progress=False)
    print(f"full: {time.perf_counter() - started:.1f}s, history {[round(h['val_acc'], 4) for h in result.history]}")
    assert result.epochs_run == 5
    assert result.metrics["val_acc"] >= 0.975, result.history


def test_auto_explains_its_choice(digits_small, tmp_path):
    messages = []
    result = visionzoo.finetune(digits_small, tmp_path / "auto", strategy="auto", epochs=1, image_size=32,
                                echo=messages.append)
    assert result.strategy is Strategy.FULL
    assert "linear probe" in result.reason and "raw pixels" in result.reason
    assert any(m.startswith("strategy: full (a linear probe scores") for m in messages), messages
    assert json.loads((result.bundle / "bundle.json").read_text())["training"]["strategy_reason"] == result.reason


@pytest.mark.parametrize(("f_acc", "p_acc", "per_class", "expected"), [
    (0.98, 0.50, 100, Strategy.LINEAR),   # the features already separate the classes
    (0.80, 0.40, 10, Strategy.LINEAR),    # too few images to tune the backbone
    (0.60, 0.58, 100, Strategy.FULL),     # the features do not transfer
    (0.80, 0.40, 800, Strategy.FULL),     # plenty of data
    (0.80, 0.40, 100, Strategy.PARTIAL),  # features transfer, a moderate amount of data
])
def test_auto_rules_cover_every_strategy(f_acc, p_acc, per_class, expected):
    from visionzoo.train.probe import decide

    choice = decide(f_acc, p_acc, per_class, held_out=60, unfreeze=2)
    assert choice.strategy is expected
    assert f"{f_acc:.1%}" in choice.reason and choice.feature_acc == f_acc


def test_auto_chooses_linear_for_a_handful_of_images_per_class(digits_small, tmp_path):
    few = tmp_path / "few"
    for folder in sorted(p for p in digits_small.iterdir() if p.is_dir()):
        (few / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:8]:
            (few / folder.name / image.name).write_bytes(image.read_bytes())
    result = visionzoo.finetune(few, tmp_path / "auto_linear", strategy="auto", epochs=2, image_size=32,
                                progress=False, num_workers=0)
    assert result.strategy is Strategy.LINEAR and "images per class" in result.reason
    assert visionzoo.create_model(result.bundle).num_classes == 10


@pytest.mark.slow  # 23 s quiet
def test_partial_trains_only_the_last_stages(digits_small, tmp_path):
    result = visionzoo.finetune(digits_small, tmp_path / "partial", strategy="partial", unfreeze=1, epochs=1,
                                image_size=32, progress=False, num_workers=0, precision="bf16")
    assert json.loads((result.bundle / "bundle.json").read_text())["training"]["precision_used"] == "bf16"
    trained = load_file(result.bundle / "model.safetensors")
    pretrained = visionzoo.create_model("efficientnet_lite0", pretrained=True).state_dict()
    last_stage = "features.6."  # the last stage is features.6 .. features.8
    for key, value in pretrained.items():
        if key.startswith("features.") and int(key.split(".")[1]) < 6:
            assert torch.equal(trained[key], value), key  # frozen, BatchNorm statistics included
    assert not torch.equal(trained[last_stage + "0.block.0.0.weight"], pretrained[last_stage + "0.block.0.0.weight"])
    assert not torch.equal(trained["features.8.1.running_mean"], pretrained["features.8.1.running_mean"])


def test_csv_training_set_with_a_separate_validation_tree(digits_small, tmp_path):
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(digits_small.glob("*/*.png"))[::2]]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    result = visionzoo.finetune(train=tmp_path / "train.csv", val=digits_small, out=tmp_path / "run",
                                strategy="linear", image_size=32, epochs=2, progress=False, num_workers=0)
    meta = json.loads((result.bundle / "bundle.json").read_text())["training"]
    assert (meta["train_images"], meta["val_images"]) == (100, 200)
    assert result.classes == tuple(str(d) for d in range(10))


def test_gradient_accumulation_matches_a_larger_batch(digits_small, tmp_path):
    common = {"strategy": "linear", "image_size": 32, "epochs": 3, "progress": False, "num_workers": 0}
    big = visionzoo.finetune(digits_small, tmp_path / "big", batch_size=32, **common)
    small = visionzoo.finetune(digits_small, tmp_path / "acc", batch_size=16, accumulate=2, **common)
    wa, wb = load_file(big.bundle / "model.safetensors"), load_file(small.bundle / "model.safetensors")
    for key in ("classifier.1.weight", "classifier.1.bias"):
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)


RESUME_RUN = {"strategy": "full", "epochs": 3, "head_epochs": 1, "image_size": 32, "batch_size": 16}


@pytest.mark.slow  # three runs and a subprocess (18 s quiet)
def test_a_run_killed_in_epoch_2_resumes_to_the_same_weights(digits_small, tmp_path):
    kill_in_epoch_2(digits_small, tmp_path / "run", RESUME_RUN, tmp_path)
    with pytest.raises(InputError, match="pass --resume"):
        visionzoo.finetune(digits_small, tmp_path / "run", **RESUME_RUN, progress=False)

    resumed = visionzoo.finetune(digits_small, tmp_path / "run", **RESUME_RUN, resume=True, progress=False)
    straight = visionzoo.finetune(digits_small, tmp_path / "straight", **RESUME_RUN, progress=False)
    assert resumed.metrics["val_acc"] == straight.metrics["val_acc"]
    assert resumed.best_epoch == straight.best_epoch
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    wa, wb = load_file(resumed.bundle / "model.safetensors"), load_file(straight.bundle / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow  # two processes each: 13-16 s quiet
@pytest.mark.parametrize("strategy", ["full", "linear"])
def test_torchrun_with_two_processes_writes_a_loadable_bundle(digits_small, tmp_path, strategy):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "visionzoo", "finetune", str(digits_small), "--out", str(out), "--strategy", strategy,
           "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--quiet"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("strategy " + strategy) == 1, proc.stdout  # only rank 0 reports
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["training"]["processes"] == 2 and len(meta["history"]) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bundle", "checkpoint.pt", "history.json"] + (["features.pt"] if strategy == "linear" else []))
    model = visionzoo.create_model(out)
    preds = visionzoo.predict([digits_small / "3"], model=model, topk=1, num_workers=0)
    assert len(preds) == len(list((digits_small / "3").iterdir()))
    history = meta["history"]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns


def test_a_diverging_loss_stops_with_a_clear_error(digits_small, tmp_path, monkeypatch, capsys):
    import visionzoo.train.loop as loop

    real = loop.F.cross_entropy
    calls = [0]

    def exploding(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", exploding)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 3: training diverged; lower"):
        visionzoo.finetune(digits_small, tmp_path / "nan", strategy="linear", image_size=32, epochs=1,
                           progress=False, num_workers=0)
    calls[0] = 0
    code, out, err = run(capsys, "finetune", digits_small, "--out", tmp_path / "nan2", "--strategy", "linear",
                         "--image-size", "32", "--epochs", "1", "--workers", "0", "--quiet")
    assert code == 1 and "training diverged" in err


def test_bad_arguments_are_one_line_errors(digits_small, tmp_path, capsys):
    code, out, err = run(capsys, "finetune", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 1 and "not a dataset" in err
    code, out, err = run(capsys, "finetune", digits_small, "--train", digits_small, "--out", tmp_path / "x")
    assert code == 1 and "not both" in err
    code, out, err = run(capsys, "finetune", digits_small, "--out", tmp_path / "x", "--val-fraction", "2")
    assert code == 1 and "val_fraction" in err
    code, out, err = run(capsys, "evaluate", tmp_path, digits_small)
    assert code == 1 and "not" in err


# -- hostile data and a busy run folder (issue 13) --------------------------------------------------

def test_images_over_the_decode_budget_are_left_out_and_listed(digits_small, tmp_path, capsys):
    from .hostile import apng_frames, png

    data = tmp_path / "digits"
    shutil.copytree(digits_small, data)
    (data / "3" / "deep.png").write_bytes(png(13_000, 13_000, 16, rows=1))  # 1 GB to decode
    (data / "5" / "frames.png").write_bytes(apng_frames(2**31 - 1))
    (data / "7" / "notes.png").write_text("not an image")
    # trained on: only the area of each crop is resized, so no aspect ratio costs memory
    (data / "9" / "wide.png").write_bytes(png(100_000, 1, fill=255))
    code, out, err = run(capsys, "finetune", data, "--out", tmp_path / "run", "--strategy", "linear",
                         "--image-size", "32", "--epochs", "1", "--workers", "0", "--quiet", "--json")
    assert code == cli.EXIT_PARTIAL, err
    failed = {Path(f["path"]).name: f["reason"] for f in json.loads(out)["failures"]}
    assert sorted(failed) == ["deep.png", "frames.png", "notes.png"]
    assert "memory limit" in failed["deep.png"] and "frame limit" in failed["frames.png"]
    assert all(f"skipped {data}" in line for line in err.splitlines() if line.startswith("skipped"))
    assert len([line for line in err.splitlines() if line.startswith("skipped")]) == 3
    raised = visionzoo.finetune(data, tmp_path / "run2", strategy="linear", image_size=32, epochs=1,
                                progress=False, num_workers=0, limits="frames=none")
    assert sorted(Path(f.path).name for f in raised.failures) == ["deep.png", "notes.png"]


def test_a_class_left_without_usable_images_is_refused(digits_small, tmp_path):
    """The class check runs again on what is left once the unusable images are left out."""
    data = tmp_path / "digits"
    shutil.copytree(digits_small, data)
    for image in (data / "3").iterdir():
        image.write_text("not an image")
    with pytest.raises(InputError, match="no training images for class 3"):
        visionzoo.finetune(data, tmp_path / "run", strategy="linear", image_size=32, epochs=1, progress=False,
                           num_workers=0)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_in_use_is_refused_before_any_work(digits_small, tmp_path):
    from visionzoo.errors import OutputBusyError

    from .hostile import hold

    holder = hold(tmp_path / "run", 120)
    try:
        started = time.monotonic()
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid}"):
            visionzoo.finetune(digits_small, tmp_path / "run", strategy="linear", epochs=1, progress=False)
        assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()
    finally:
        holder.kill()
        holder.wait()
