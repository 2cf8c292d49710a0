"""Labelled datasets: an ImageFolder-style tree and a CSV of path,label rows."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from visionzoo import ImageError, InputError
from visionzoo.data.datasets import ImageDataset, open_dataset
from visionzoo.weights.records import Preprocess

from .photos import sample_image


@pytest.fixture
def tree(tmp_path):
    """root/cat/{a.png, sub/b.jpg}, root/coffee/c.png, plus things that are not samples."""
    root = tmp_path / "train"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "coffee").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    cat = Image.open(sample_image("chelsea.png")).convert("RGB")
    cat.save(root / "cat" / "a.png")
    cat.save(root / "cat" / "sub" / "b.jpg")
    shutil.copy(sample_image("coffee.png"), root / "coffee" / "c.png")
    (root / "coffee" / "notes.txt").write_text("not an image extension: not a sample")
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    cat.save(root / "stray.png")  # directly under the root: no class
    return root


def test_image_folder(tree):
    ds = ImageDataset.from_folder(tree)
    assert ds.classes == ["cat", "coffee"] and ds.class_to_idx == {"cat": 0, "coffee": 1}
    assert [(p.relative_to(tree).as_posix(), y) for p, y in ds.samples] == [
        ("cat/a.png", 0), ("cat/sub/b.jpg", 0), ("coffee/c.png", 1)]
    assert ds.targets == [0, 0, 1] and ds.class_counts() == {"cat": 2, "coffee": 1}
    img, label = ds[2]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 1

    tensors = ds.with_transform(Preprocess(64, 56).transforms())
    x, y = tensors[0]
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and y == 0
    batch = next(iter(torch.utils.data.DataLoader(tensors, batch_size=3)))
    assert batch[0].shape == (3, 3, 56, 56) and batch[1].tolist() == [0, 0, 1]


def test_fixed_classes_keep_the_order_of_another_split(tree):
    ds = ImageDataset.from_folder(tree, classes=["zebra", "coffee", "cat"])
    assert ds.classes == ["zebra", "coffee", "cat"] and ds.targets == [2, 2, 1]
    with pytest.raises(InputError, match="coffee"):
        ImageDataset.from_folder(tree, classes=["cat"])


def test_folder_errors(tree, tmp_path):
    (tree / "empty_class").mkdir()
    with pytest.raises(InputError, match="empty_class holds no image files"):
        ImageDataset.from_folder(tree)
    with pytest.raises(InputError, match="does not exist"):
        ImageDataset.from_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputError, match="no class sub-folders"):
        ImageDataset.from_folder(tmp_path / "flat")


def test_csv(tree):
    csv_file = tree.parent / "labels.csv"
    csv_file.write_text("id,Path,label\n1,train/coffee/c.png,10\n2,train/cat/a.png,2\n"
                        f"3,{tree / 'cat' / 'sub' / 'b.jpg'},2\n")
    ds = ImageDataset.from_csv(csv_file)
    assert ds.classes == ["2", "10"]  # integer labels sort as numbers
    assert [(p.name, y) for p, y in ds.samples] == [("c.png", 1), ("a.png", 0), ("b.jpg", 0)]
    assert ds[0][1] == 1
    assert open_dataset(csv_file).classes == ["2", "10"] and open_dataset(tree).classes == ["cat", "coffee"]


@pytest.mark.parametrize("text,match", [
    ("file,label\na.png,x\n", "no 'path' column"),
    ("path,label\na.png,\n", "line 2: empty label"),
    ("path,label\n", "no rows"),
])
def test_csv_errors(tmp_path, text, match):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(InputError, match=match):
        ImageDataset.from_csv(tmp_path / "d.csv")


def test_bad_image_in_a_dataset_names_the_file(tree):
    (tree / "coffee" / "broken.jpg").write_text("not a jpeg")
    ds = ImageDataset.from_folder(tree)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.jpg"][0]
    with pytest.raises(ImageError, match="broken.jpg: not an image"):
        ds[bad]
    with pytest.raises(InputError, match="not a dataset"):
        open_dataset(tree / "coffee" / "c.png")
